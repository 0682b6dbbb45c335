"""Benchmark: MIP forward+backward, exact-compute prompt attention vs the literal concat form.

Same model, same weights, same batch; the two forms are timed alternately in one run (the order is
swapped every round). Prints the times, the speed-up, and GFLOP per image of both forms, computed
analytically and counted with torch's FlopCounterMode (forward, matmuls/convs/attention).

    python launch/bench_model.py                      # ViT-B/16 MIP, 256x128, batch 8, CPU fp32
    python launch/bench_model.py --repeats 3 --warmup 1 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mip_dist.config import ModelConfig, load_config
from mip_dist.losses import MIPLoss
from mip_dist.model import build_model


def analytic_gflops(m: ModelConfig, impl: str, batch: int) -> float:
    """Forward GFLOP per image (2 per multiply-add; matmuls, convs and attention only)."""
    C, H, W = m.embed_dim, *m.img_size
    hidden = int(C * m.mlp_ratio)
    n_patch = ((H - m.patch_size) // m.stride + 1) * ((W - m.patch_size) // m.stride + 1)
    N = n_patch + 1
    L = m.num_prompted_layers if (m.use_mpl or m.use_ipg) else 0
    Pm = m.num_modality_prompts if m.use_mpl else 0
    Pi = m.num_instance_prompts if m.use_ipg else 0

    def block(rows: float, keys: float, qkv_rows: float, kv_rows: float) -> float:
        """rows: query/MLP rows, keys: attended keys; qkv/kv_rows: tokens projected to q,k,v / to k,v only."""
        return (2 * qkv_rows * C * 3 * C + 2 * kv_rows * C * 2 * C + 4 * rows * keys * C
                + 2 * rows * C * C + 4 * rows * C * hidden)

    total = 2 * n_patch * C * 3 * m.patch_size ** 2
    for _ in range(L):
        if impl == "concat":
            T = N + Pm + Pi
            total += block(T, T, T, 0)
            if m.use_ipg and m.ipg_mode == "generation":
                total += block(Pi + n_patch, Pi + n_patch, Pi + n_patch, 0)
        else:  # bank k/v (2 entries) and the IPG queries' q/k/v are computed once per batch
            total += block(N, N + Pm + Pi, N, Pi + 2 * Pm / batch)
            if m.use_ipg and m.ipg_mode == "generation":
                total += block(Pi, Pi + n_patch, Pi / batch, n_patch)
    plain = (m.depth - 1 if m.jpm else m.depth) - L
    total += plain * block(N, N, N, 0)
    if m.jpm:
        total += block(N, N, N, 0)  # b1
        part = 1 + n_patch // m.num_parts
        total += m.num_parts * block(part, part, part, 0)  # b2
    return total / 1e9


def counted_gflops(model, images, modality, camera) -> float:
    """Forward GFLOP per image counted by FlopCounterMode (CPU flash attention registered too)."""
    def sdpa(query_shape, key_shape, value_shape, *args, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(images, modality, camera)
    return counter.get_total_flops() / 1e9 / images.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/mip_vitb16_sysu.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per form")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per form")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--impl", default="torch", choices=["torch", "auto", "triton"], help="exact-compute impl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["model.pretrained="] + args.overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, num_classes=395, num_cameras=6).to(device).train()
    criterion = MIPLoss(cfg.loss)
    B = args.batch
    images = torch.randn(B, 3, *cfg.model.img_size, device=device)
    modality = torch.arange(B, device=device) % 2
    camera = torch.arange(B, device=device) % 6
    pids = torch.arange(B, device=device) // 4

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(impl: str) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one forward+backward."""
        model.attention_impl = impl
        model.zero_grad(set_to_none=True)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = criterion(model(images, modality, camera), pids, modality, epoch=1000)
        loss.backward()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    forms = [args.impl, "concat"]
    print(f"MIP {cfg.model.embed_dim}d x {cfg.model.depth} blocks, {cfg.model.img_size[0]}x{cfg.model.img_size[1]}, "
          f"{cfg.model.num_modality_prompts}+{cfg.model.num_instance_prompts} prompts, jpm={cfg.model.jpm}, "
          f"batch {B}, {device.type}, fp32, threads {torch.get_num_threads()}")
    for impl in forms:
        model.attention_impl = impl
        print(f"  {impl:>7}: analytic {analytic_gflops(cfg.model, impl, B):7.2f} GFLOP/img forward, "
              f"counted {counted_gflops(model.eval(), images, modality, camera):7.2f}", flush=True)
    model.train()
    wall: dict[str, list[float]] = {f: [] for f in forms}
    cpu: dict[str, list[float]] = {f: [] for f in forms}
    for r in range(args.warmup + args.repeats):
        for impl in (forms if r % 2 == 0 else forms[::-1]):
            t, c = step(impl)
            if r >= args.warmup:
                wall[impl].append(t)
                cpu[impl].append(c)
            print(f"  round {r} {'warm-up' if r < args.warmup else 'timed'} {impl:>7}: {t:.3f} s wall, "
                  f"{c:.3f} s cpu", flush=True)
    med = {f: statistics.median(v) for f, v in wall.items()}
    med_cpu = {f: statistics.median(v) for f, v in cpu.items()}
    for f in forms:
        print(f"{f:>7}: median {med[f]:.3f} s/step wall (min {min(wall[f]):.3f}), {med_cpu[f]:.3f} s cpu, "
              f"n={len(wall[f])}")
    flop_ratio = analytic_gflops(cfg.model, "concat", B) / analytic_gflops(cfg.model, args.impl, B)
    paired = statistics.median(c / e for c, e in zip(wall["concat"], wall[args.impl]))
    print(f"speed-up (concat / {args.impl}): {med['concat'] / med[args.impl]:.2f}x wall (median of per-round "
          f"ratios {paired:.2f}x), {med_cpu['concat'] / med_cpu[args.impl]:.2f}x process CPU time "
          f"(analytic FLOP ratio {flop_ratio:.2f}x)")


if __name__ == "__main__":
    main()
