"""--push-to-hub: the Hub calls (a recording HfApi), and each failure as one line naming the repo and the fix."""

from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.stages.publish import check_push, push_adapter

REPO = "someone/tiny-reasonmaxxer"


def _adapter_dir(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "reasonmaxxer_base.json", "README.md"):
        (d / name).write_text("{}")
    return d


class RecordingApi:
    calls: list = []
    fail = None  # an exception create_repo raises

    def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False, **kw):
        if RecordingApi.fail is not None:
            raise RecordingApi.fail
        RecordingApi.calls.append(
            ("create_repo", repo_id, {"private": private, "repo_type": repo_type, "exist_ok": exist_ok})
        )
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, **kw):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        RecordingApi.calls.append(("upload_folder", repo_id, {"repo_type": repo_type, "files": files}))


@pytest.fixture
def api(monkeypatch):
    RecordingApi.calls, RecordingApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def test_push_creates_the_repo_and_uploads_the_adapter_dir(tmp_path, api):
    url = push_adapter(_adapter_dir(tmp_path), REPO)
    assert url == f"https://huggingface.co/{REPO}"
    (c, u) = api.calls
    assert c == ("create_repo", REPO, {"private": True, "repo_type": "model", "exist_ok": True})
    assert u[:2] == ("upload_folder", REPO) and u[2]["repo_type"] == "model"
    assert {"adapter_config.json", "README.md", "reasonmaxxer_base.json"} <= set(u[2]["files"])


def test_no_adapter_is_refused_before_any_call(tmp_path, api):
    with pytest.raises(ReasonMaxxerError, match="holds no exported adapter"):
        push_adapter(tmp_path, REPO)
    assert api.calls == []


def _one_line(e, *needles):
    msg = str(e.value)
    assert "\n" not in msg and REPO in msg, msg
    for n in needles:
        assert n in msg, msg


def test_offline_mode_is_one_line(tmp_path, monkeypatch):
    """The real HfApi under HF_HUB_OFFLINE: huggingface_hub raises OfflineModeIsEnabled before any request."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import (huggingface_hub/constants.py)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    with pytest.raises(ReasonMaxxerError) as e:
        push_adapter(_adapter_dir(tmp_path), REPO)
    _one_line(e, "unset HF_HUB_OFFLINE")
    assert type(e.value.__cause__).__name__ == "OfflineModeIsEnabled"
    with pytest.raises(ReasonMaxxerError) as e:  # and up front, before a run starts
        check_push(REPO)
    _one_line(e, "unset HF_HUB_OFFLINE")


def test_http_errors_and_no_network_are_one_line(tmp_path, api):
    req = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    api.fail = HfHubHTTPError("401 Unauthorized\nInvalid credentials", response=httpx2.Response(401, request=req))
    with pytest.raises(ReasonMaxxerError) as e:
        push_adapter(_adapter_dir(tmp_path), REPO)
    _one_line(e, "HTTP 401", "hf auth login", "HF_TOKEN")
    api.fail = httpx2.ConnectError("Name or service not known", request=req)
    with pytest.raises(ReasonMaxxerError) as e:
        push_adapter(tmp_path / "adapter", REPO)
    _one_line(e, "could not reach the Hub", "hf upload")


def test_check_push_up_front(monkeypatch):
    check_push("")  # nothing to push: no checks
    with pytest.raises(ReasonMaxxerError) as e:
        check_push(REPO, full_finetune=True)
    _one_line(e, "full fine-tune")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ReasonMaxxerError) as e:
        check_push(REPO)
    _one_line(e, "no Hugging Face token", "HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    check_push(REPO)
