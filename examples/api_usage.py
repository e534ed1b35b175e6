"""Run slimmer's stages one by one from Python on the trained CIFAR-10 ResNet-20 checkpoint.

    python examples/api_usage.py

Decompose, prune, a short distillation fine-tune on 512 training images, ONNX export with a
parity check, and a MACs and latency comparison: what `slimmer.apply` does, step by step.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

import slimmer  # noqa: E402
from slimmer.data import build_dataset, make_loader, sample_inputs  # noqa: E402
from slimmer.recipe import DataConfig, DatasetConfig, DecomposeConfig, FinetuneConfig, PruneConfig, RankRule  # noqa: E402

SHARED = REPOSITORY.parent / "shared"
NORMALIZE = {"normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}


def main() -> None:
    model = slimmer.load_model(SHARED / "models" / "resnet20-cifar10-jpeg.th",
                               architecture="examples.cifar_resnet:resnet20", search_path=[REPOSITORY])
    example = torch.randn(1, 3, 32, 32)

    decomposed = slimmer.decompose(model, DecomposeConfig(rank=RankRule(ratio=0.5), round_to=8), example)
    print(f"decompose: {len(decomposed.changed)} layers rewritten, {len(decomposed.skipped)} skipped")
    pruned = slimmer.prune(decomposed.model, PruneConfig(ratio=0.25, round_to=8), example)
    print(f"prune: {len(pruned.changed)} channel groups pruned")

    train = build_dataset(DatasetConfig(image_folder=str(SHARED / "data" / "cifar10-jpeg" / "train"),
                                        transform=["to_tensor", NORMALIZE], limit=512),
                          lambda path: Path(path), [])
    loader = make_loader(train, DataConfig(), batch_size=64, shuffle=True)
    tuned = slimmer.finetune(pruned.model, FinetuneConfig(steps=8, lr=0.01), loader, teacher=copy.deepcopy(model),
                             progress=False)
    print(f"finetune: loss {tuned.stats['first_loss']:.3f} -> {tuned.stats['last_loss']:.3f}")

    with tempfile.TemporaryDirectory() as folder:
        original_onnx = slimmer.export_onnx(model, example, Path(folder) / "original.onnx")
        compressed_onnx = slimmer.export_onnx(tuned.model, example, Path(folder) / "compressed.onnx")
        parity = slimmer.check_parity(compressed_onnx, tuned.model, sample_inputs(train, 32, [3, 32, 32]),
                                      atol=1e-4, rtol=1e-3)
        print(f"ONNX parity: max abs diff {parity['max_abs_diff']:.2e}")
        latency = slimmer.measure_latency({"original": original_onnx, "compressed": compressed_onnx},
                                          [3, 32, 32], batch_sizes=[1], threads=1)

    before, _ = slimmer.count_macs(model, example)
    after, _ = slimmer.count_macs(tuned.model, example)
    print(f"MACs: {before:,} -> {after:,} ({after / before:.2f}x)")
    print(f"latency batch 1: {latency['original'][1]['median']:.3f} ms -> {latency['compressed'][1]['median']:.3f} ms")


if __name__ == "__main__":
    main()
