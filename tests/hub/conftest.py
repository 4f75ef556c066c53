"""A tiny two-task KeepLoRA++ run (the toy LLaVA sequence of tests/continual), shared by the hub tests."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "continual"))

from transformers import TrainingArguments  # noqa: E402

from keeplora_hf.continual import ContinualRunner, ContinualTask, GeneralSet  # noqa: E402
from keeplora_hf.continual.evaluation import answer_exact_match  # noqa: E402
from toy_sequence import samples, toy_model  # noqa: E402


def toy_tasks(tiny, count: int) -> tuple[list[ContinualTask], list[GeneralSet]]:
    """Small sets so a task costs a second or two: 8 training samples (one batch), 8 eval samples."""
    metric = answer_exact_match(batch_size=8)
    tasks = [
        ContinualTask(f"rule{r}", samples(tiny, r, 8, 10 + r), samples(tiny, r, 8, 100 + r), metric)
        for r in range(count)
    ]
    return tasks, [GeneralSet("general", samples(tiny, 7, 8, 500), metric)]


def training_args(tmp_path: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "unused"),
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=5e-2,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )


def run_toy(out: Path, count: int, *, tasks=None, **config) -> dict:
    model, tiny = toy_model(**config)
    all_tasks, general = toy_tasks(tiny, count)
    return ContinualRunner(model, tasks or all_tasks, training_args(out.parent), out, general_sets=general).run()


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes: to prove a directory was not changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """A finished two-task run directory; tests must not change it (copy it first)."""
    out = tmp_path_factory.mktemp("hub") / "run"
    run_toy(out, 2)
    return out


@pytest.fixture(scope="session")
def toy_run_with_bases(tmp_path_factory) -> Path:
    """The same run keeping every layer's principal basis (`keep_principal_basis=True`; the default saves only the
    principal energies of the layers that store the complement of their protected subspace)."""
    out = tmp_path_factory.mktemp("hub_bases") / "run"
    run_toy(out, 2, keep_principal_basis=True)
    return out


def fresh_base():
    """The tiny LLaVA the toy run started from (same seed, so the same weights)."""
    from keeplora_hf.models import build_tiny

    return build_tiny("llava").model


def logits(model, tiny) -> torch.Tensor:
    """The model's logits on a fixed batch of the tiny VLM, in eval mode: to compare two models' outputs."""
    batch = tiny.make_batch(2, 7)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _real_signature(method):
    """Refuse a call the real `HfApi` method would refuse (an unknown keyword, a missing argument), then record it."""
    import functools
    import inspect

    from huggingface_hub import HfApi

    signature = inspect.signature(getattr(HfApi, method.__name__))

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        signature.bind(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    return checked


class FakeHfApi:
    """Records what a push sends: repos, every commit's files (bytes read at commit time), branches and tags.

    Every method checks its arguments against the real `HfApi` method's signature, so a wrong keyword fails here as it
    would on the Hub.
    """

    def __init__(self, fail_on_commit: bool = False) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.commits: list[dict] = []
        self.files: dict[str, dict[str, bytes]] = {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}}
        self.tags: dict[str, str] = {}
        self.fail_on_commit = fail_on_commit

    @_real_signature
    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    @_real_signature
    def list_repo_files(self, repo_id, revision=None, **kwargs):
        self.calls.append(("list_repo_files", {"repo_id": repo_id, "revision": revision}))
        return sorted(self.files[revision or "main"])

    @_real_signature
    def create_commit(self, repo_id, operations, commit_message, revision=None, **kwargs):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        self.calls.append(("create_commit", {"repo_id": repo_id, "revision": revision}))
        if self.fail_on_commit:
            raise ConnectionError("the Hub went away")
        branch = revision or "main"
        files = dict(self.files[branch])
        added = {}
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                added[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
            elif isinstance(op, CommitOperationDelete):
                files.pop(op.path_in_repo)
        files.update(added)
        self.files[branch] = files
        oid = hashlib.sha1(f"{len(self.commits)}{branch}".encode()).hexdigest()
        self.commits.append({"branch": branch, "message": commit_message, "added": added, "oid": oid,
                             "deleted": [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)],
                             "kwargs": kwargs})
        return SimpleNamespace(oid=oid, commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}")

    @_real_signature
    def create_branch(self, repo_id, branch, revision=None, exist_ok=False, **kwargs):
        self.calls.append(("create_branch", {"branch": branch, "revision": revision}))
        if branch not in self.files:
            source = next((c["branch"] for c in self.commits if c["oid"] == revision), "main")
            self.files[branch] = dict(self.files[source])

    @_real_signature
    def delete_branch(self, repo_id, branch, **kwargs):
        self.calls.append(("delete_branch", {"branch": branch}))
        self.files.pop(branch)

    @_real_signature
    def list_repo_refs(self, repo_id, **kwargs):
        return SimpleNamespace(tags=[SimpleNamespace(name=t) for t in self.tags], branches=[])

    @_real_signature
    def create_tag(self, repo_id, tag, revision=None, **kwargs):
        self.calls.append(("create_tag", {"tag": tag, "revision": revision}))
        self.tags[tag] = revision

    @_real_signature
    def delete_tag(self, repo_id, tag, **kwargs):
        self.calls.append(("delete_tag", {"tag": tag}))
        self.tags.pop(tag)

    def materialize(self, root: Path, branch: str = "main") -> Path:
        """The branch's files as a local directory: what snapshot_download would give."""
        for name, data in self.files[branch].items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root
