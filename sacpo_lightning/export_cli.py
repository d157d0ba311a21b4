"""``sacpo export SRC OUT``: a plain Hugging Face folder from any export or merge, optionally pushed to the Hub.

Example (a QLoRA step-2 export, its adapter chain merged into the base, written in bfloat16)::

    sacpo export outputs/step2/export outputs/step2/plain --dtype bfloat16

``OUT`` then loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` (and vLLM, lm-eval) without this library. The
options are the parameters of :func:`export` (a jsonargparse parser built from its signature), so
``sacpo export --config export.yaml SRC OUT`` and ``--print_config`` work like ``sacpo merge``'s.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from sacpo_lightning.cli_args import parse_command
from sacpo_lightning.errors import MissingFileError, UserError, debug_enabled
from sacpo_lightning.models.export import export_plain_folder

__all__ = ["build_parser", "export", "main", "push_folder"]


class PushError(UserError, RuntimeError):
    """Uploading to the Hugging Face Hub is not possible (no token, offline, or the network failed)."""


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Uploads ``folder`` to the Hub model repository ``repo_id`` (created if missing); returns the commit URL.

    Raises:
        PushError: Hub access is switched off (``HF_HUB_OFFLINE``), no token is configured, or the upload failed.
    """
    # huggingface_hub is imported here: only uploading needs it
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PushError(f"--push_to_hub {repo_id}: Hugging Face Hub access is off (HF_HUB_OFFLINE is set); unset it "
                        f"on a machine with network access, or upload {folder} later.")
    token = get_token()
    if not token:
        raise PushError(f"--push_to_hub {repo_id}: no Hugging Face token found; run `hf auth login` or set HF_TOKEN, "
                        "then rerun.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 ignore_patterns=[".complete"], commit_message="Upload model exported by sacpo export")
    except OSError as err:  # requests' and httpx's connection errors are OSErrors
        raise PushError(f"--push_to_hub {repo_id}: upload of {folder} failed ({err}); check the network and the "
                        "repository name, then rerun.") from err
    return str(getattr(info, "commit_url", info))


def export(
    src: str,
    out: str,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    budget: str | None = None,
) -> Path:
    """Writes a plain Hugging Face folder (adapter chains merged into the base) from an export or merge.

    Args:
        src: An export or merge folder of this library (full weights or adapters).
        out: The folder to write (replaced atomically if it exists).
        dtype: Dtype of the written weights (default: the source's).
        push_to_hub: Also upload the folder to this Hub model repository (``user/name``); needs a token and network.
        private: Create the Hub repository as private.
        budget: The safety budget's ``budget.json`` that picked this model's lambda, for the model card.

    Returns:
        The written folder.
    """
    card = {}
    if budget is not None:
        path = Path(budget)
        if not path.is_file():
            raise MissingFileError(f"--budget: {path} does not exist; pass the budget stage's budget.json.")
        card["budget"] = json.loads(path.read_text())
    folder = export_plain_folder(src, out, dtype=dtype, card=card)
    if push_to_hub:
        print(f"Pushed {folder} to {push_folder(folder, push_to_hub, private=private)}")
    return folder


def build_parser() -> ArgumentParser:
    """The ``sacpo export`` parser: ``SRC OUT`` positionals, ``--config``, ``--print_config`` and the options of
    :func:`export`."""
    parser = ArgumentParser(prog="sacpo export", description=export.__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with the options below.")
    parser.add_argument("src", type=str, help="An export or merge folder of this library.")
    parser.add_argument("out", type=str, help="The plain Hugging Face folder to write.")
    parser.add_function_arguments(export, as_group=False, skip={"src", "out"})
    return parser


def main(argv: list[str]) -> int:
    """Runs ``sacpo export``; returns the exit status (2 for bad arguments, missing folders or a failed upload)."""
    kwargs, code = parse_command(build_parser(), [a.replace("--push-to-hub", "--push_to_hub") for a in argv])
    if kwargs is None:
        return code
    try:
        folder = export(**kwargs)
    except (PushError, ValueError, OSError) as err:
        if debug_enabled():
            traceback.print_exception(err)
        print(f"sacpo export: error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {folder}")
    return 0
