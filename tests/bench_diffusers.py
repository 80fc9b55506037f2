"""
`python bench.py mmdit` with diffusers' SD3Transformer2DModel timed beside ours, the same shapes
and weights, iterations interleaved. A development tool: diffusers comes from
requirements-dev.txt and is never needed at run time. Takes bench.py mmdit's options:

    python tests/bench_diffusers.py --config sd3-medium --depth 2 --size 256x256 --backward
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import mmdit  # noqa: E402
from cli import run_cli  # noqa: E402


def diffusers_twin(config, ours):
    """diffusers' SD3Transformer2DModel of the same shapes, holding `ours`'s weights."""
    try:
        from diffusers import SD3Transformer2DModel
    except ImportError:
        raise ValueError("tests/bench_diffusers.py needs the diffusers package, which is not "
                         "importable here (pip install -r requirements-dev.txt; it is not a run-time "
                         "requirement)") from None
    if config.mlp_ratio != 4:
        raise ValueError(f"--config: diffusers' SD3 transformer has MLP ratio 4, this config "
                         f"{config.mlp_ratio}")
    param = next(ours.parameters())
    with torch.device(param.device):
        ref = SD3Transformer2DModel(
            sample_size=config.pos_embed_max_size, patch_size=config.patch_size,
            in_channels=config.in_channels, num_layers=config.depth,
            attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
            joint_attention_dim=config.context_dim, caption_projection_dim=config.hidden_size,
            pooled_projection_dim=config.pooled_dim, out_channels=config.out_channels,
            pos_embed_max_size=config.pos_embed_max_size,
            dual_attention_layers=config.dual_attention_layers,
            qk_norm="rms_norm" if config.qk_norm else None)
    ref = torch.nn.Module.to(ref, param.device, param.dtype)  # diffusers' own .to warns about dtypes
    missing, unexpected = ref.load_state_dict(mmdit.to_diffusers(ours.state_dict()), strict=False)
    if unexpected or set(missing) - {"pos_embed.pos_embed"}:
        raise RuntimeError(f"diffusers' model does not take our weights: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return ref


def reference(config, ours):
    """bench.measure_mmdit's reference: diffusers' model and how to call it like ours."""
    ref = diffusers_twin(config, ours)
    return "diffusers", ref, lambda x, t, context, pooled: ref(
        hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
        timestep=1000 * t, return_dict=False)[0]


def run(args):
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return bench.bench_mmdit(args, reference)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda given: bench.parse_args(["mmdit", *given]), run, argv)


if __name__ == "__main__":
    main()
