"""`qserve serve` (also bare `qserve --model ...`): the OpenAI-compatible server, natively or through vLLM."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import click

from qformats.errors import QError
from qserve.cli_group import ErrorHandlingGroup
from qserve.cli_options import compile_option, device_option, dtype_option, revision_option


class ServeByDefaultGroup(ErrorHandlingGroup):
    """`qserve --model X ...` means `qserve serve --model X ...` (options first, no subcommand name)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH_OR_HUB_ID`, or `PATH_OR_HUB_ID` alone, named after its last path part (`owner/guanaco` -> guanaco)."""
    name, sep, source = spec.partition("=")
    if sep and name and "/" not in name:
        if not source:
            raise QError(f"--adapter {spec!r}: nothing after '=' (use NAME=PATH)")
        return name, source
    source = spec
    name = PurePosixPath(source.rstrip("/")).name
    if not name or name in (".", ".."):
        raise QError(f"--adapter {spec!r}: cannot name it after its path; use NAME=PATH")
    return name, source


def adapter_map(specs: tuple[str, ...]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, source = parse_adapter_spec(spec)
        if name in adapters:
            raise QError(f"two adapters are named {name!r}: name them with NAME=PATH")
        adapters[name] = source
    return adapters


@click.command("serve")
@click.option("--model", "model", required=True, help="Base model: NF4 (or fp16/bf16) folder or Hub id owner/name.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="A PEFT LoRA adapter (folder or Hub id) to serve as model NAME; repeatable. "
                   "A bare PATH is named after its last path part.")  # fmt: skip
@click.option("--served-model-name", default=None, help="The base model's name in the API (default: --model as given).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded together (KV-cache slots).")  # fmt: skip
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting for a slot before new ones get HTTP 429.")  # fmt: skip
@click.option("--max-model-len", default=None, type=click.IntRange(min=2),
              help="Context per request, prompt plus answer (default: the model's, at most 2048).")  # fmt: skip
@dtype_option(auto="float32 on CPU, the checkpoint's dtype on CUDA")
@device_option
@revision_option()
@click.option("--engine", "engine_kind", default="native", show_default=True, type=click.Choice(["native", "vllm"]),
              help="native: this process; vllm: check the model and adapters against vLLM's limits and run "
                   "`vllm serve` with the matching flags (for GPUs and more traffic).")  # fmt: skip
@click.option("--tensor-parallel-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="vLLM only. Refused above 1 for bitsandbytes checkpoints: use --pipeline-parallel-size.")  # fmt: skip
@click.option("--pipeline-parallel-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="vLLM only: GPUs to split the layers over.")  # fmt: skip
@click.option("--dry-run", is_flag=True,
              help="Check everything and print what would run (the vllm serve command, or the native server's "
                   "models), then exit.")  # fmt: skip
@click.option("--api-key", envvar="QSERVE_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every /v1 route (native engine).")  # fmt: skip
@click.option("--max-body-mb", default=4.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest request body read; larger ones get HTTP 413.")  # fmt: skip
@click.option("--max-prompts", default=256, show_default=True, type=click.IntRange(min=1),
              help="Prompts in one /v1/completions request (a list); more get HTTP 400.")  # fmt: skip
@click.option("--enable-lora-loading", is_flag=True,
              help="Allow /v1/load_lora_adapter and /v1/unload_lora_adapter (off: any client could load files).")  # fmt: skip
@click.option("--adapter-root", default=None, type=click.Path(exists=True, file_okay=False),
              help="With --enable-lora-loading: load only folders under this one (lora_path relative to it).")  # fmt: skip
@click.option("--max-lora-rank", default=64, show_default=True, type=click.IntRange(min=1),
              help="Largest rank of an adapter loaded at run time.")  # fmt: skip
@click.option("--max-lora-mb", default=512.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest adapter_model.safetensors loaded at run time.")  # fmt: skip
@click.option("--max-loras", default=16, show_default=True, type=click.IntRange(min=1),
              help="Most adapters loaded at once; a run-time load beyond it gets HTTP 400.")  # fmt: skip
@compile_option
def serve(model, adapters, served_model_name, host, port, max_batch, max_queue, max_model_len, dtype, device,
          revision, engine_kind, tensor_parallel_size, pipeline_parallel_size, dry_run, api_key, max_body_mb, max_prompts,
          enable_lora_loading, adapter_root, max_lora_rank, max_lora_mb, max_loras, compile_):  # fmt: skip
    """Serve a base model and LoRA adapters over an OpenAI-compatible HTTP API.

    Each request's `model` field picks the base (its served name) or an adapter (its NAME).

    \b
    Examples:
      qserve --model ./smollm2-nf4 --adapter answer=./runs/answer-adapter
      qserve serve --model ./nf4 --adapter guanaco --adapter chat=owner/chat-lora --port 8080
      qserve --model ./nf4 --adapter ./a --engine vllm --pipeline-parallel-size 2 --dry-run
    \b
    Then, e.g.:
      curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "answer", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    named = adapter_map(adapters)
    if engine_kind == "vllm" and compile_:
        raise QError("--compile applies to the native engine (vLLM compiles on its own)")
    if engine_kind == "vllm":
        from qserve.vllm_handoff import run_vllm, vllm_command

        cmd = vllm_command(model, named, host=host, port=port, max_batch=max_batch, max_model_len=max_model_len,
                           served_model_name=served_model_name, tensor_parallel_size=tensor_parallel_size,
                           pipeline_parallel_size=pipeline_parallel_size, dtype=dtype or "auto", revision=revision,
                           api_key=api_key or None)  # fmt: skip
        if dry_run:
            click.echo(cmd.shell())
            return
        run_vllm(cmd)
        return
    if tensor_parallel_size > 1 or pipeline_parallel_size > 1:
        raise QError("--tensor-parallel-size / --pipeline-parallel-size apply to --engine vllm; the native engine "
                     "runs on one device")  # fmt: skip
    if adapter_root and not enable_lora_loading:
        raise QError("--adapter-root applies to adapters loaded at run time: add --enable-lora-loading")
    from qserve.request_guard import ServerPolicy
    from qserve.server import build_server, run_server

    policy = ServerPolicy(api_key=api_key or None, max_body_bytes=int(max_body_mb * 2**20),
                          enable_lora_loading=enable_lora_loading, adapter_root=Path(adapter_root) if adapter_root else None,
                          max_lora_rank=max_lora_rank, max_lora_bytes=int(max_lora_mb * 2**20), max_loras=max_loras,
                          max_prompts=max_prompts)  # fmt: skip
    app, engine = build_server(model, named, served_model_name=served_model_name, max_batch=max_batch,
                               max_queue=max_queue, max_model_len=max_model_len,
                               dtype=dtype, device=device, revision=revision, progress=True,
                               policy=policy, compile=compile_)  # fmt: skip
    state = app.state.qserve
    names = ", ".join([state.model_name, *engine.adapter_ids])
    click.echo(f"models: {names}; max batch {max_batch}, queue {max_queue}, context {engine.max_model_len}", err=True)
    if dry_run:
        engine.stop()
        click.echo(f"would serve on http://{host}:{port}/v1 (dry run)")
        return
    run_server(app, engine, host, port)

