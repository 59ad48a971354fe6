"""Publishing a trained adapter to the Hugging Face Hub (``--push-to-hub REPO``).

The exported adapter dir (adapter_config.json, weights, tokenizer, ``reasonmaxxer_base.json``
and the model card README.md, see `checkpoint.save_adapter` / `write_model_card`) is
uploaded as is to a model repo, created (private) when it does not exist.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ReasonMaxxerError

# huggingface_hub 2.x ships the `hf` command (hf auth login); 0.x shipped `huggingface-cli login`
_LOGIN = "run `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN to a write token"


def check_push(repo_id: str, *, full_finetune: bool = False) -> None:
    """Before a run that will push (repo_id non-empty): the errors that can be known up front
    (a full fine-tune has no adapter, offline mode, no token), as one line each."""
    if not repo_id:
        return
    if full_finetune:
        raise ReasonMaxxerError(
            f"--push-to-hub {repo_id}: uploads the LoRA adapter, and a full fine-tune has none; "
            "train without --full-finetune, or upload train/merged yourself with `hf upload`"
        )
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise ReasonMaxxerError(
            f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to upload"
        )
    if get_token() is None:
        raise ReasonMaxxerError(f"--push-to-hub {repo_id}: no Hugging Face token; {_LOGIN}")


def push_adapter(adapter_dir: str | Path, repo_id: str, *, private: bool = True) -> str:
    """Upload `adapter_dir` to the Hub model repo `repo_id`; returns the repo's URL.

    Errors (no token, offline, HTTP) are one `ReasonMaxxerError` line naming the repo and the fix.
    """
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise ReasonMaxxerError(f"--push-to-hub {repo_id}: {d} holds no exported adapter (adapter_config.json)")
    import httpx2  # huggingface_hub's HTTP client (a dependency of huggingface_hub 2.x; hf_api.py imports it)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    api = HfApi()
    try:
        # huggingface_hub/hf_api.py: create_repo(repo_id, *, token=None, private=None, ..., repo_type=None,
        # exist_ok=False, ...); upload_folder(*, repo_id, folder_path, path_in_repo=None, commit_message=None,
        # ..., repo_type=None, ...)
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(d),
            repo_type="model",
            commit_message="reasonmaxxer: upload the trained adapter",
        )
    except OfflineModeIsEnabled as e:
        raise ReasonMaxxerError(
            f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to upload"
        ) from e
    except LocalTokenNotFoundError as e:
        raise ReasonMaxxerError(f"--push-to-hub {repo_id}: no Hugging Face token; {_LOGIN}") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReasonMaxxerError(
            f"--push-to-hub {repo_id}: the Hub refused (HTTP {status}: {first}); {_LOGIN}, "
            "and check that the repo id's namespace is yours (or an org you can write to)"
        ) from e
    except (OSError, httpx2.TransportError) as e:  # no network: connection errors, timeouts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReasonMaxxerError(
            f"--push-to-hub {repo_id}: could not reach the Hub ({first}); check the network, "
            f"or upload later with `hf upload {repo_id} {d}`"
        ) from e
    return str(url)
