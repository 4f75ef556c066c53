"""KeepLoRACallback gives the KeepLoRA++ guarantees with the plain Trainer, a custom Trainer subclass and TRL's SFTTrainer."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from keeplora_hf import KeepLoRACallback, KeepLoRAConfig, learned_update, protected_basis
from keeplora_hf.models import build_tiny
from keeplora_hf.tuner.model import tuner_of

from toy_sequence import toy_tasks


class WeightedLossTrainer(Trainer):
    """A user's own Trainer: a custom compute_loss, as LLaVA's and LlamaFactory's trainers have."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = 0.5 * outputs.loss
        return (loss, outputs) if return_outputs else loss


def _targets(model) -> dict:
    return {n: m for n, m in model.named_modules() if hasattr(m, "keeplora_state")}


def _layer_inputs(model, batch) -> dict[str, torch.Tensor]:
    """Every target's input rows on `batch`."""
    seen, handles = {}, []

    def keep(name: str, x: torch.Tensor) -> None:
        seen.setdefault(name, x.detach().reshape(-1, x.shape[-1]).float())

    for name, module in _targets(model).items():
        handles.append(module.register_forward_hook(lambda m, args, out, name=name: keep(name, args[0])))
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return seen


def check_two_tasks(model, train_task, first_batch) -> None:
    """Two tasks through `train_task(model, index) -> callback`; the invariants of the KeepLoRATrainer tests."""
    config = model.peft_config["default"]
    first_inputs = None
    for index in range(2):
        before = {n: learned_update(model, n) for n in _targets(model)}
        protected = {}

        def snapshot(model=model, protected=protected):
            protected.update({n: protected_basis(model, n).float() for n in _targets(model)})

        callback = train_task(model, index, snapshot)
        assert model.base_model.progress("default").in_task
        for name, module in _targets(model).items():
            lora_A = module.lora_A["default"].weight
            assert (lora_A @ protected[name].to(lora_A)).abs().max() < 1e-5, name  # A in the residual
            assert lora_A.requires_grad == config.train_lora_A
        callback.end_task(model)
        updates = {n: learned_update(model, n) - before[n] for n in _targets(model)}
        worst = max((u @ protected[n]).norm().item() / max(u.norm().item(), 1e-30) for n, u in updates.items())
        assert worst <= 1e-4, (index, worst)  # the task's update is orthogonal to what it had to protect
        assert sum(u.norm().item() for u in updates.values()) > 0
        if index == 0:
            first_inputs = _layer_inputs(model, first_batch)
    # the second task barely touches the first task's layer inputs, compared with random inputs of the same size
    on_first = on_random = 0.0
    g = torch.Generator().manual_seed(0)
    for name, x in first_inputs.items():
        update = updates[name]
        noise = torch.randn(x.shape, generator=g) * x.norm() / x.numel() ** 0.5
        on_first += (x @ update.T).norm().item() ** 2
        on_random += (noise @ update.T).norm().item() ** 2
    assert on_first < 0.25 * on_random, (on_first, on_random)


def _snapshot_callback(snapshot):
    class Snapshot(KeepLoRACallback.__bases__[0]):  # a plain TrainerCallback, run after KeepLoRACallback's begin
        def on_train_begin(self, args, state, control, **kwargs):
            snapshot()

    return Snapshot()


@pytest.mark.parametrize("trainer_class", [Trainer, WeightedLossTrainer], ids=["Trainer", "custom_subclass"])
@pytest.mark.parametrize("train_lora_A", [False, True], ids=["frozen_A", "trained_A"])
def test_callback_with_any_transformers_trainer(tmp_path, trainer_class, train_lora_A):
    tiny = build_tiny("llava")
    config = KeepLoRAConfig(r=4, lora_alpha=8, target_modules=tiny.language_targets, principal_energy=0.3,
                            train_lora_A=train_lora_A)
    model = get_peft_model(tiny.model, config)
    tasks, _ = toy_tasks(tiny, count=2, train_size=32)

    def train_task(model, index, snapshot):
        callback = KeepLoRACallback()
        args = TrainingArguments(output_dir=str(tmp_path / str(index)), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_grad_norm=0.5, num_train_epochs=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        trainer = trainer_class(model=model, args=args, train_dataset=tasks[index].train_dataset,
                                callbacks=[callback, _snapshot_callback(snapshot)])
        trainer.train()
        return callback

    first = tasks[0].train_dataset
    batch = {k: torch.stack([first[i][k] for i in range(8)]) for k in first[0]}
    check_two_tasks(model, train_task, batch)


def test_callback_with_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer on the demo model with conversational `messages` + `images` rows, as TRL's VLM docs use."""
    trl = pytest.importorskip("trl")
    from keeplora_hf.data.synthetic.tasks import make_task
    from keeplora_hf.models.demo import DEMO_LANGUAGE_TARGETS, load_demo_model
    from datasets import Dataset

    base, processor = load_demo_model(None)
    model = get_peft_model(base, KeepLoRAConfig(r=4, lora_alpha=8, target_modules=DEMO_LANGUAGE_TARGETS,
                                                gradient_data_ratio=0.5))

    def rows(task: str) -> Dataset:
        return Dataset.from_list([
            {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]},
                          {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}],
             "images": [s.image]}
            for s in make_task(task, "train", 16)
        ])

    data = [rows("frame_colour"), rows("count_red")]

    def train_task(model, index, snapshot):
        callback = KeepLoRACallback()
        args = trl.SFTConfig(output_dir=str(tmp_path / str(index)), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=5e-3, report_to=[], use_cpu=True, save_strategy="no", max_length=None,
                             disable_tqdm=True)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data[index], processing_class=processor,
                                 callbacks=[callback, _snapshot_callback(snapshot)])
        trainer.train()
        return callback

    first = processor.apply_chat_template(data[0][0]["messages"], tokenize=False)
    batch = processor(text=[first], images=[data[0][0]["images"]], return_tensors="pt")
    check_two_tasks(model, train_task, dict(batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_resumed_train_whose_task_state_was_not_loaded_is_refused(tmp_path, device, dtype):
    """DeepSpeed restores its own checkpoint only: a resumed `train()` on a model outside a task must not begin the task
    again (B = 0 inside a half-trained optimizer) but say what to load."""
    tiny = build_tiny("llava")
    tiny.model.to(device=device, dtype=dtype)
    model = get_peft_model(tiny.model, KeepLoRAConfig(r=4, lora_alpha=8, target_modules=tiny.language_targets))
    tasks, _ = toy_tasks(tiny, count=1, train_size=8)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    loader = DataLoader(tasks[0].train_dataset, batch_size=4)
    with pytest.raises(RuntimeError, match="resumes a checkpoint at step 2.*model.load_adapter"):
        KeepLoRACallback().on_train_begin(args, TrainerState(global_step=2), TrainerControl(), model=model,
                                          train_dataloader=loader)
    assert not tuner_of(model).progress("default").in_task
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_" in n)  # nothing begun


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_save_strategy_best_is_refused_when_the_state_is_sharded(tmp_path, device, dtype, monkeypatch):
    """With the KeepLoRA state sharded by layer (a fully sharded base over several ranks, stood in for here), a save
    the Trainer decides after an evaluation runs on the main process alone, where the state cannot be fetched: refused
    before anything begins, naming what works. The same arguments without sharding train as usual."""
    import keeplora_hf.tuner.context as context_module

    tiny = build_tiny("llava")
    tiny.model.to(device=device, dtype=dtype)
    model = get_peft_model(tiny.model, KeepLoRAConfig(r=4, lora_alpha=8, target_modules=tiny.language_targets))
    tasks, _ = toy_tasks(tiny, count=1, train_size=8)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, eval_strategy="steps",
                             save_strategy="best", metric_for_best_model="loss")
    loader = DataLoader(tasks[0].train_dataset, batch_size=4)
    monkeypatch.setattr(context_module, "state_owners", lambda model, layers: dict.fromkeys(layers, 0))
    with pytest.raises(ValueError, match="save_strategy='best' is not supported with a fully sharded base.*'steps'"):
        KeepLoRACallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model, train_dataloader=loader)
    assert not tuner_of(model).progress("default").in_task
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_" in n)  # nothing begun
    monkeypatch.undo()
    KeepLoRACallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model, train_dataloader=loader)
    assert tuner_of(model).progress("default").in_task
