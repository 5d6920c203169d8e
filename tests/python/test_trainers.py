"""Real trainers as clients of the wrapper: PyTorch Lightning's Trainer
(gradient clipping and accumulation, its checkpoints) and Hugging Face's
transformers.Trainer on a tiny GPT-2 and BERT built from configs. Exact mode
trains as plain training does; the closed form at eta 0.1 and sign_symmetry
train; what each trainer saves reloads into a fresh wrapper and trains on.
Optional dependencies: skipped with the reason when absent."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from torch import nn
from zoo import load_torch_ar

SETTINGS = [
    pytest.param({}, id="exact"),
    pytest.param({"eta": 0.1, "steps": 100}, id="closed_form_eta0.1"),
    pytest.param({"variant": "sign_symmetry"}, id="sign_symmetry"),
]


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ Lightning

needs_lightning = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None,
    reason="lightning is not installed (pip install -r requirements.txt)",
)


def _lightning_module_class():
    import lightning as L

    class Classifier(L.LightningModule):
        """A small CNN with BatchNorm, wrapped when `settings` is not None."""

        def __init__(self, settings: dict | None) -> None:
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            net = nn.Sequential(
                nn.Conv2d(3, 4, 3),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 6 * 6, 3),
            )
            self.net = net if settings is None else load_torch_ar().ARBackward(net, **settings)

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            # The wrapper's parameters: the module's and psi.
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Classifier


def _lightning_data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _lightning_fit(module, steps: int, root, ckpt_path=None):
    import lightning as L

    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True)],
    )
    trainer.fit(module, _lightning_data(), ckpt_path=ckpt_path)
    return trainer


@needs_lightning
@pytest.mark.parametrize("settings", SETTINGS)
def test_lightning_trainer_clips_accumulates_saves_and_resumes(settings, tmp_path):
    Classifier = _lightning_module_class()
    module = Classifier(settings)
    start = copy.deepcopy(module.state_dict())
    _lightning_fit(module, 4, tmp_path / "run")
    moved = [k for k, v in module.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.endswith("weight") for k in moved), "training changed no weight"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    if not settings:
        # Exact mode trains as plain training does, through the same trainer.
        plain = Classifier(None)
        _lightning_fit(plain, 4, tmp_path / "plain")
        ours = {k.replace("net.module.", "net."): v for k, v in module.state_dict().items()}
        for key, value in plain.state_dict().items():
            assert torch.equal(ours[key], value), key  # bit for bit, BatchNorm buffers too
    # The checkpoint reloads into a fresh wrapper (psi included) and trains on.
    last = tmp_path / "run" / "last.ckpt"
    reloaded = Classifier.load_from_checkpoint(str(last))
    _assert_same_state(reloaded.state_dict(), module.state_dict())
    _lightning_fit(reloaded, 6, tmp_path / "resumed", ckpt_path=str(last))
    assert any(
        not torch.equal(v, module.state_dict()[k]) for k, v in reloaded.state_dict().items()
    ), "the resumed run did not train"


# --------------------------------------------------------------- transformers

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("accelerate") is None,
    reason="transformers and accelerate are not installed (pip install -r requirements.txt)",
)


def _hf_model(kind: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=50,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
            # The Trainer saves a wrapper's state dict with safetensors, which
            # refuses tied tensors (see Getting started).
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, kind: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (16, 12), generator=g)
        self.classes = torch.randint(0, 3, (16,), generator=g)
        self.kind = kind

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i] if self.kind == "gpt2" else self.classes[i]
        return {"input_ids": self.ids[i], "labels": labels}


def _hf_train(model: nn.Module, kind: str, out, steps: int = 4):
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=steps,
        logging_steps=1,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        # The wrapper's forward takes (*args, **kwargs): keep the batch's
        # columns instead of filtering them by that signature.
        remove_unused_columns=False,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(kind))
    result = trainer.train()
    return trainer, result


@needs_transformers
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_transformers_trainer_trains_saves_and_reloads(kind, settings, tmp_path):
    from safetensors.torch import load_file

    torch_ar = load_torch_ar()
    model = _hf_model(kind)
    plain = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model, **settings)
    start = copy.deepcopy(ar.state_dict())
    _, result = _hf_train(ar, kind, tmp_path / "ar")
    assert math.isfinite(result.training_loss)
    assert ar.last_stats is not None, "the relaxation did not run"
    moved = [k for k, v in ar.state_dict().items() if not torch.equal(v, start[k])]
    assert len(moved) > len(ar.state_dict()) // 2, "training changed few tensors"
    if not settings:
        _hf_train(plain, kind, tmp_path / "plain")
        ours = dict(ar.module.named_parameters())
        for name, p in plain.named_parameters():
            assert torch.equal(ours[name], p), name  # bit for bit
    # The saved state dict (module weights and psi) reloads into a fresh
    # wrapper and trains on.
    saved = load_file(str(tmp_path / "ar" / "checkpoint-4" / "model.safetensors"))
    fresh = torch_ar.ARBackward(_hf_model(kind), **settings)
    fresh.load_state_dict(saved)
    _assert_same_state(fresh.state_dict(), ar.state_dict())
    _, again = _hf_train(fresh, kind, tmp_path / "again", steps=2)
    assert math.isfinite(again.training_loss)
    assert any(not torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
