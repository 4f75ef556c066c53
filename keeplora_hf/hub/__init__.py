"""Share continual runs on the Hugging Face Hub, and continue them from there.

- `render_card(run)` (`card`): the model card of a run: metadata for the Hub, the task sequence, the
  hyperparameters, the accuracy matrix and metrics, and how to load it.
- `push_run(run_dir, repo_id)` (`push`): the run's final KEEPLORA adapter (with the whole continual state), its
  plain-LoRA export, `results.json`, the plots, the run record and the card, in ONE commit; optionally one revision
  per task. `run_and_push(runner, repo_id)` runs a `ContinualRunner`, then pushes what it learned.
- `load_run(run_or_repo, base_model)` (`load`): base + learned tasks + subspace state, rebuilt from a run directory
  or a pushed repo, ready for the next task.
- `seed_run_dir(run_or_repo, new_output_dir, tasks=...)` (`seed`): a new run directory holding a saved or pushed run,
  so `ContinualRunner` resumes from it and learns the tasks appended to the sequence; `continue_from` does it once,
  for a command that may be run again. `export_run(run_or_repo, out, after_task=K)`: the plain LoRA of the first K
  tasks (rank K*r).
- `open_run(run_or_repo)` (`repo`): a run read from a directory, or downloaded from a pushed repo.

Layout of a pushed repo (main branch): ``adapter_config.json`` + ``adapter_model.safetensors`` (the KEEPLORA
adapter after the last learned task; its safetensors hold the continual state), ``plain_lora/`` (the same change as
a plain LoRA), ``README.md`` (the card), ``results.json``, ``report.md``, the PNG plots, and the run record that
`seed_run_dir` needs (`keeplora_hf.continual.run_dir`): ``run.json``, ``row_000.json``, ``tasks/NNN_<name>/row.json``.
A per-task revision holds the same files for the state after that task. Only the final adapter is pushed (each
adapter carries every task's update, plus subspace bases that may weigh gigabytes on a 7B model), so a repo rebuilds
the state after its last task, and every earlier task's plain LoRA, but the continual state after an earlier task
only from that task's revision.
"""

from ..continual.run_dir import RunInfo, read_run
from .card import render_card
from .load import load_run
from .push import PushResult, push_run, run_and_push
from .repo import HubOfflineError, check_repo_id, hub_offline, open_run
from .seed import continue_from, export_run, seed_run_dir

__all__ = [
    "HubOfflineError",
    "PushResult",
    "RunInfo",
    "check_repo_id",
    "continue_from",
    "export_run",
    "hub_offline",
    "load_run",
    "open_run",
    "push_run",
    "read_run",
    "render_card",
    "run_and_push",
    "seed_run_dir",
]
