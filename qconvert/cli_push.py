"""`qconvert push PATH REPO_ID`: publish an NF4 checkpoint, adapter or merged model with its model card.

The `--push-to-hub REPO_ID` that `quantize`, `finetune` and `export` take is `qserve.cli_options.push_to_hub_option`.
"""

from __future__ import annotations

import click


@click.command("push")
@click.argument("path", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (ignored if it already exists).")
@click.option("--revision", metavar="BRANCH", help="Push to this branch, created from main if missing.")
@click.option("--commit-message", metavar="TEXT", help="Commit message (default: 'Upload <kind> with qconvert').")
@click.option("--token", metavar="TOKEN", help="Hub token with write access (default: HF_TOKEN, else `hf auth login`).")
@click.option("--base-model", metavar="OWNER/NAME",
              help="Hub repo of the base model, for the card's base_model when the folder does not lead to one.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Verify, list files and sizes, print the card; no network, nothing written.")
def push(path: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
         token: str | None, base_model: str | None, dry_run: bool) -> None:  # fmt: skip
    """Verify PATH and upload it to the Hugging Face Hub as REPO_ID (owner/name, or name under your user).

    \b
    PATH is a folder qconvert or qserve wrote:
      NF4 checkpoint   (config.json with a bitsandbytes 4-bit quantization_config)
      LoRA adapter     (adapter_config.json + adapter_model.safetensors, PEFT format)
      merged model     (config.json without quantization_config, from `qserve export`)

    A folder that fails verification (qconvert.json checksums, PEFT fields, safetensors headers)
    is refused. README.md is written or refreshed with the Hub's metadata (base_model, license,
    relation, tags) and snippets for transformers, vLLM and qserve; a hand-written README.md keeps
    its text and only gains missing metadata. --base-model names the base when the folder's lineage
    does not reach a Hub repo (without one the card has no base_model, and a warning says so).
    Absolute local paths in JSON files are uploaded as Hub ids or folder names. The repo is created
    if needed. HF_ENDPOINT selects another Hub.

    \b
    Examples:
      qconvert push ./nf4 me/SmolLM2-135M-Instruct-nf4 --dry-run
      qconvert push ./adapter me/smollm2-json-adapter --private
      qconvert push ./merged me/smollm2-merged --revision experiment-1
    """
    from qformats.hub_pull import human_size
    from qformats.hub_push import push_folder  # the Hub client: imported when the command runs, not for --help

    result = push_folder(path, repo_id, private=private, revision=revision, commit_message=commit_message,
                         token=token, dry_run=dry_run, base_model=base_model, report=lambda line: click.echo(line, err=True))  # fmt: skip
    if dry_run:
        click.echo(f"dry run: would push {result.kind} folder {path} to {result.repo_id}"
                   + (f" (branch {result.revision})" if result.revision else ""))  # fmt: skip
        width = max(len(p) for p, _ in result.files)
        for name, size in result.files:
            click.echo(f"  {name:<{width}}  {human_size(size):>10}")
        click.echo(f"  {'total':<{width}}  {human_size(sum(n for _, n in result.files)):>10}")
        click.echo("\n----- README.md -----")
        click.echo(result.card)
    else:
        click.echo(result.url)

