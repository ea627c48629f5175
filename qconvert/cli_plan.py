"""`qconvert plan MODEL`: predicted peak memory of a fine-tuning run, per device, from config.json alone.

A thin shell over `qconvert.memory_plan`; nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import json

import click

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # memory_plan.ALL_LINEAR, without its import


def _targets(text: str) -> tuple[str, ...]:
    return tuple(ALL_LINEAR.split(",")) if text == "all-linear" else tuple(t.strip() for t in text.split(",") if t.strip())


@click.command("plan")
@click.argument("model")
@click.option("--seq-len", type=int, default=1024, show_default=True, help="Tokens per example (finetune's --max-seq-len).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Examples per micro-batch per process.")
@click.option("--rank", "-r", type=int, default=64, show_default=True, help="LoRA rank r.")
@click.option("--target-modules", default="all-linear", show_default=True,
              help="Comma-separated decoder linears (q_proj,v_proj), or all-linear.")  # fmt: skip
@click.option("--gpus", type=int, default=1, show_default=True, help="Processes (GPUs, or CPU processes under torchrun).")
@click.option("--gpu-memory", default=None, metavar="SIZE", help="Memory per device for the fit verdict, e.g. 24GiB.")
@click.option("--fsdp", is_flag=True, help="Shard the 4-bit base, LoRA weights, gradients and optimizer state over --gpus.")
@click.option("--fsdp-offload", is_flag=True, help="With --fsdp: keep the shards in host memory.")
@click.option("--optimizer-bits", type=click.Choice(("32", "8")), default="32", show_default=True)
@click.option("--gradient-checkpointing", type=click.Choice(("on", "off")), default="on", show_default=True)
@click.option("--device", type=click.Choice(("cpu", "cuda")), default="cuda", show_default=True)
@click.option("--dtype", type=click.Choice(("float32", "bfloat16", "float16")), default=None,
              help="Compute dtype  [default: bfloat16 on cuda, float32 on cpu]")  # fmt: skip
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when MODEL is a Hub id.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model, seq_len, batch_size, rank, target_modules, gpus, gpu_memory, fsdp, fsdp_offload, optimizer_bits,
             gradient_checkpointing, device, dtype, revision, as_json):  # fmt: skip
    """Predict the peak memory per device of `qconvert finetune MODEL` with these settings.

    MODEL is a local folder or a Hub id with a config.json (only config.json is fetched; no
    weights). Prints the peak broken down (4-bit base or its shard, all-gather buffers, LoRA
    weights, gradients and optimizer state, activations, the loss chunk, allocator slack, CUDA
    context, the CPU-side runtime) and, with --gpu-memory, whether it fits, and if not the
    cheapest change that does. The model and its calibration: docs/memory-plan.md.

    \b
    Example:
      qconvert plan ./smollm2-nf4 --device cpu --seq-len 256 --rank 16
      qconvert plan meta-llama/Llama-2-70b-hf --seq-len 2048 --batch-size 2 --gpus 2 --fsdp --fsdp-offload --gpu-memory 24GiB
    """
    from qconvert.memory_plan import Settings, cheapest_fit, plan
    from qformats.checkpoint import load_config
    from qformats.hub_pull import resolve_source
    from qformats.sharded_writer import parse_size

    settings = Settings(seq_len=seq_len, batch_size=batch_size, rank=rank, target_modules=_targets(target_modules),
                        gpus=gpus, fsdp=fsdp, fsdp_offload=fsdp_offload, optimizer_bits=int(optimizer_bits),
                        gradient_checkpointing=gradient_checkpointing == "on", device=device, dtype=dtype,
                        gpu_memory=parse_size(gpu_memory) if gpu_memory else None)  # fmt: skip
    folder = resolve_source(model, revision=revision, allow_patterns=["config.json"])
    config = load_config(folder)
    result = plan(config, settings, name=f"{model}/config.json")
    fix = cheapest_fit(config, settings) if result.fits is False else None
    if as_json:
        out = result.to_json()
        out["cheapest_fit"] = {"change": fix[0], "plan": fix[1].to_json()} if fix else None
        click.echo(json.dumps(out, indent=1))
    else:
        click.echo(_report(model, result, fix))


def _report(model: str, result, fix) -> str:
    from qconvert.memory_plan import format_bytes

    s = result.settings
    lines = [(f"{model}: {result.params / 1e9:.2f}B parameters, LoRA r={s.rank} on {len(s.target_modules)} linears "
             f"per layer: {result.lora_params / 1e6:.1f}M trainable; batch {s.batch_size} x {s.seq_len} tokens per "
             f"process, {s.gpus} process(es){', FSDP' if s.fsdp else ''}{' + offload' if s.fsdp_offload else ''}, "
             f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.optimizer_bits}-bit optimizer")]  # fmt: skip
    for b in result.devices:
        lines.append(f"\n{b.device}: predicted peak {format_bytes(b.total)}")
        width = max(len(k) for k in b.terms)
        lines += [f"  {k:<{width}}  {format_bytes(v):>10}" for k, v in b.terms.items()]
    if result.fits is not None:
        lines.append(f"\nverdict: {'fits' if result.fits else 'does not fit'} in {format_bytes(s.gpu_memory)} per device")
    if result.fits is False:
        lines.append(f"cheapest change that fits: {fix[0]} (peak {format_bytes(fix[1].devices[0].total)})" if fix
                     else "no change tried fits: more or larger devices are needed")  # fmt: skip
    return "\n".join(lines)
