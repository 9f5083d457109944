"""Time one optimizer step of the plain transformers model against its Cal-DETR subclass.

Same config, same weights, same batch; runs interleaved (plain, cal, plain, cal, ...) after a warm-up; the
median of each and their ratio are printed (and appended to a markdown file with --output). With ``--rounds R``
this is done R times, each round with freshly built models (where a model's tensors lie in memory moves its step
time by a few tenths of a percent, which one pair of models cannot average out): the row gives the median over the
rounds of each round's medians and ratio, and the lowest and highest round ratio.

    python benchmarks/train_step.py                                  # every family, the main job's model size, CPU
    python benchmarks/train_step.py --model deformable_detr --size r50 --dtype bf16   # R50, 300 queries, 800x1066
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from hf_caldetr.families import MODEL_FAMILIES, preset_config_kwargs
from hf_caldetr.training import check_config_overrides, parse_config_overrides, split_cal_overrides


def build_pair(model_type: str, size: str, num_labels: int, config_overrides: dict | None = None):
    """The stock model and its Cal class (the paper's settings, unless ``config_overrides`` sets a Cal field) from
    the registry's ``size`` preset with ``config_overrides``, one config."""
    family = MODEL_FAMILIES[model_type]
    overrides, cal_settings = split_cal_overrides(config_overrides)
    check_config_overrides(family, overrides)
    kwargs = preset_config_kwargs(family, size, num_labels=num_labels, **overrides)
    return (family.model_class, family.config_class(**kwargs), family.cal_model_class,
            family.cal_config_class(**kwargs, **cal_settings))


def make_batch(batch_size, height, width, num_labels, boxes_per_image, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, height, width, generator=generator).to(device)
    labels = []
    for _ in range(batch_size):
        centers = 0.2 + 0.6 * torch.rand(boxes_per_image, 2, generator=generator)
        sizes = 0.05 + 0.3 * torch.rand(boxes_per_image, 2, generator=generator)
        labels.append({"class_labels": torch.randint(0, num_labels, (boxes_per_image,), generator=generator).to(device),
                       "boxes": torch.cat([centers, sizes], 1).to(device)})
    return pixel_values, labels


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model, optimizer, batch, autocast):
    pixel_values, labels = batch
    with autocast():
        loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(args):
    # On a shared CPU, wall time measures the neighbours; the process's CPU time (one thread) measures the step.
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    device = torch.device(args.device)
    plain_cls, plain_config, cal_cls, cal_config = build_pair(args.model, args.size, args.num_labels,
                                                              args.overrides)
    torch.manual_seed(0)
    plain = plain_cls(plain_config).to(device).train()
    cal = cal_cls(cal_config).to(device).train()
    cal.load_state_dict(plain.state_dict())
    models = {"plain": plain, "cal": cal}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in models.items()}
    batch = make_batch(args.batch_size, args.height, args.width, args.num_labels, args.boxes_per_image, device)
    if args.dtype == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = nullcontext

    times = {name: [] for name in models}
    peak_memory = {}
    for name, model in models.items():
        for _ in range(args.warmup):
            step(model, optimizers[name], batch, autocast)
    for i in range(args.steps):
        order = ["plain", "cal"] if i % 2 == 0 else ["cal", "plain"]
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            start = clock()
            step(models[name], optimizers[name], batch, autocast)
            synchronize(device)
            times[name].append(clock() - start)
            if device.type == "cuda":
                peak_memory[name] = max(peak_memory.get(name, 0), torch.cuda.max_memory_allocated())
    medians = {name: statistics.median(values) for name, values in times.items()}
    return medians, peak_memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_FAMILIES), nargs="+", default=sorted(MODEL_FAMILIES),
                        help="the registered families timed, one after the other (default: all)")
    parser.add_argument("--size", choices=["tiny", "small", "r50"], default="small",
                        help="a model preset of the registry (hf_caldetr.families): small is what examples/train.py "
                             "trains by default (the main job's model), tiny the tests' models, r50 the published "
                             "shapes (random weights; for a GPU) (default: %(default)s)")
    parser.add_argument("--config_overrides", default=None,
                        help="config fields of both models as examples/train.py takes them, e.g. "
                             "auxiliary_loss=true; a Cal field (use_logit_mixing=false, ...) goes to the Cal model "
                             "only. The row's size column shows them (default: the preset as it is)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per step (default: 8 for small, the main job's; 4 for tiny; 2 for r50)")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels (default: 96 for small, the main job's; 64 for tiny; 800 for r50)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in pixels (default: 96 for small; 64 for tiny; 1066 for r50)")
    parser.add_argument("--num_labels", type=int, default=None,
                        help="number of classes (default: 10 for small and tiny, the digits; 91 for r50, COCO's)")
    parser.add_argument("--boxes_per_image", type=int, default=4,
                        help="random ground-truth boxes per image (default: %(default)s; the digits average 3.6)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 autocast of the forward pass and loss (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed optimizer steps of each model, interleaved; the median is reported "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the measurement with freshly built models; the median of the rounds' ratios "
                             "is reported with their range (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed optimizer steps of each model before the timed ones (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--timer", choices=["wall", "cpu"], default=None,
                        help="wall clock (default on GPU) or this process's CPU time with one thread (default on CPU)")
    parser.add_argument("--output", default=None,
                        help="append the result rows to this markdown file (default: print them only)")
    args = parser.parse_args()
    defaults = {"small": (8, 96, 96, 10), "tiny": (4, 64, 64, 10), "r50": (2, 800, 1066, 91)}[args.size]
    args.batch_size, args.height, args.width, args.num_labels = (
        given or default for given, default in zip((args.batch_size, args.height, args.width, args.num_labels),
                                                   defaults))

    # Every family's configs built once before anything is timed: a misspelt field or a refused value stops here.
    args.overrides = parse_config_overrides(args.config_overrides)
    for model_type in args.model:
        build_pair(model_type, args.size, args.num_labels, args.overrides)

    if args.timer is None:
        args.timer = "wall" if args.device.startswith("cuda") else "cpu"
    if args.timer == "cpu":
        torch.set_num_threads(1)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = []
    models = args.model
    for model_type in models:
        rounds = [measure(argparse.Namespace(**{**vars(args), "model": model_type})) for _ in range(args.rounds)]
        plain_ms = statistics.median(medians["plain"] for medians, _ in rounds) * 1000
        cal_ms = statistics.median(medians["cal"] for medians, _ in rounds) * 1000
        ratios = [medians["cal"] / medians["plain"] for medians, _ in rounds]
        ratio = f"{statistics.median(ratios):.3f}"
        if args.rounds > 1:
            ratio += f" ({min(ratios):.3f}-{max(ratios):.3f})"
        peak = {name: max(peaks[name] for _, peaks in rounds) for name in rounds[0][1]}
        memory = f"{peak['plain'] / 2**30:.2f} / {peak['cal'] / 2**30:.2f}" if peak else "n/a"
        size = f"{args.size} ({args.config_overrides})" if args.config_overrides else args.size
        row = (f"| {model_type} | {size} | {args.batch_size}x{args.height}x{args.width} | {args.dtype} | "
               f"{plain_ms:.1f} | {cal_ms:.1f} | {ratio} | {memory} | {machine} |")
        rows.append(row)
        spread = f"; {args.rounds} rounds" if args.rounds > 1 else ""
        print(f"{model_type}: plain {plain_ms:.1f} ms/step, cal {cal_ms:.1f} ms/step, ratio {ratio} "
              f"(median of {args.steps}{spread}, {args.timer} time, {machine})")
    header = ("| model | size | batch | dtype | plain ms/step | cal ms/step | cal/plain"
              + (" (range over rounds)" if args.rounds > 1 else "") + " | peak GiB plain / cal | machine |\n"
              "|---|---|---|---|---|---|---|---|---|")
    print(header)
    print("\n".join(rows))
    if args.output:
        with open(args.output, "a") as handle:
            handle.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
