"""The shared training loop (diffsr.training.loop), exercised through the OSEDiff trainer on the tiny model."""

import json
import shutil

import pytest
import torch

from diffsr.errors import UsageError
from diffsr.training.base import frozen_digest
from diffsr.training.config import load_config
from diffsr.training.loop import StepBatches, derived_seed, train, trained_state
from metric_helpers import metric_weights  # noqa: F401  (fixture)
from training_helpers import hr_folder, logged, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: faster on one thread


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    return hr_folder(tmp_path_factory.mktemp("train-hr"), count=3)


def osediff_config(output_dir, tiny_base, hr_dir, metric_weights, **sections):
    return tiny_config(output_dir, "osediff", tiny_base, data={"hr": [str(hr_dir)], "crop": 64},
                       method_args={"lpips_weights": str(metric_weights)},
                       optimizers={"generator": {"lr": 1e-3}, "regularizer": {"lr": 1e-3}}, **sections)


def test_step_batches_are_a_function_of_the_step():
    full = list(StepBatches(5, 2, 1, 1, 0, seed=3, start_step=0, steps=6))
    resumed = list(StepBatches(5, 2, 1, 1, 0, seed=3, start_step=4, steps=6))
    assert resumed == full[4:]
    # Every epoch is a permutation: each run of 5 positions visits every image once.
    positions = [index for batch in full for index, _ in batch]
    assert sorted(positions[:5]) == [0, 1, 2, 3, 4] and sorted(positions[5:10]) == [0, 1, 2, 3, 4]
    # Two processes split the stream: no micro-batch is drawn twice.
    rank0 = list(StepBatches(5, 1, 2, 2, 0, seed=3, start_step=0, steps=3))
    rank1 = list(StepBatches(5, 1, 2, 2, 1, seed=3, start_step=0, steps=3))
    seeds = [seed for batch in rank0 + rank1 for _, seed in batch]
    assert len(set(seeds)) == len(seeds) == 12
    assert derived_seed(1, 2) != derived_seed(2, 1)


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_resume_continues_exactly(tmp_path, tiny_base, hr_dir, metric_weights):
    straight = train(osediff_config(tmp_path / "straight", tiny_base, hr_dir, metric_weights,
                                    train={"steps": 4, "save_every": 2}), progress=False)
    first = osediff_config(tmp_path / "split", tiny_base, hr_dir, metric_weights, train={"steps": 2, "save_every": 2})
    train(first, progress=False)
    resumed = train(osediff_config(tmp_path / "split", tiny_base, hr_dir, metric_weights,
                                   train={"steps": 4, "save_every": 2}), progress=False)
    assert list(resumed["losses"]["loss"]) == straight["losses"]["loss"][2:]  # only steps 3 and 4 ran
    a, b = trained_state(straight["trainer"]), trained_state(resumed["trainer"])
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")
    # The checkpoints hold the trained tensors only: the base networks come from the base folder.
    saved = torch.load(tmp_path / "split" / "checkpoints" / "step-4" / "trained.pt", weights_only=False)
    assert saved["step"] == 4 and set(saved["trained"]) == set(a)
    assert not any(name.startswith("text_encoder.") for name in saved["trained"])


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_training_changes_only_the_trained_parts(tmp_path, tiny_base, hr_dir, metric_weights):
    from diffsr.training import trainer_class

    config = osediff_config(tmp_path / "run", tiny_base, hr_dir, metric_weights, train={"steps": 2})
    fresh = trainer_class("osediff").from_config(config)
    before = {name: tensor.clone() for name, tensor in trained_state(fresh).items()}
    trained = train(config, progress=False)["trainer"]
    assert frozen_digest(trained) == frozen_digest(fresh)
    after = trained_state(trained)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("lora_B" in name for name in changed) and any("regularizer_unet" in name for name in changed)
    assert any(name.startswith("unet.conv_in.base_layer") for name in changed)


# Slow where the CPU has no bfloat16 instructions (AVX512-BF16/AMX): 4 min on this project's AMD EPYC CI machine, in
# this test alone; tests/test_cuda.py runs bf16 training steps on a GPU.
@pytest.mark.slow
def test_bf16_mixed_precision_and_tensorboard(tmp_path, tiny_base, hr_dir, metric_weights):
    pytest.importorskip("tensorboard")
    config = osediff_config(tmp_path / "run", tiny_base, hr_dir, metric_weights,
                            train={"steps": 2, "mixed_precision": "bf16", "log_with": "tensorboard",
                                   "gradient_checkpointing": True, "gradient_accumulation": 2},
                            validation={"images": [str(tmp_path / "missing.png"), str(hr_dir / "hr0.png")],
                                        "every": 2, "scale": 1})
    with pytest.warns(UserWarning, match="validation skipped .*missing.png"):
        result = train(config, progress=False)
    trainer = result["trainer"]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result["losses"]["loss"])
    # Trained tensors stay float32 for the optimiser; frozen ones are stored in bfloat16.
    assert {p.dtype for p in trainer.parameters() if p.requires_grad} == {torch.float32}
    assert trainer.text_encoder.get_input_embeddings().weight.dtype == torch.bfloat16
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "validation" / "step-2" / "hr0.png").is_file()


def test_bad_configs_get_one_line_errors(tmp_path, tiny_base, hr_dir, metric_weights):
    from diffsr.cli import main

    good = {"method": "osediff", "base": str(tiny_base), "output_dir": str(tmp_path / "out"),
            "data": {"hr": [str(hr_dir)], "crop": 64}, "train": {"steps": 1, "log_with": "none"},
            "method_args": {"lpips_weights": str(metric_weights)}}
    cases = [
        ({"train": {"stepz": 3}}, "unknown key 'stepz'"),
        ({"train": {"mixed_precision": "fp8"}}, "mixed_precision"),
        ({"optimizers": {"critic": {"lr": 1e-4}}}, "no optimiser 'critic'"),
        ({"method_args": {"lora_rnk": 4}}, "no method_args key 'lora_rnk'"),
        ({"stage": 3}, "no trainer for osediff stage 3"),
        ({"data": {}}, "data needs"),
    ]
    for change, message in cases:
        file = tmp_path / "config.yaml"
        file.write_text(json.dumps({**good, **change}))
        with pytest.raises(UsageError, match=message):
            config = load_config(file)
            train(config, progress=False)
    file.write_text("method: [unclosed")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(file)
    assert main(["train", str(file)]) == 2
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_cli_trains_from_a_yaml_file(tmp_path, tiny_base, hr_dir, metric_weights):
    import yaml

    from diffsr.cli import main

    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump({
        "method": "osediff", "base": str(tiny_base), "output_dir": str(tmp_path / "run"),
        "data": {"hr": [str(hr_dir)], "crop": 64}, "train": {"steps": 5, "log_with": "none"},
        "method_args": {"lpips_weights": str(metric_weights)}}))
    assert main(["train", str(file), "--set", "train.steps=1", "--set", "train.save_every=1", "--quiet"]) == 0
    assert [row["step"] for row in logged(tmp_path / "run")] == [1]
    assert (tmp_path / "run" / "checkpoints" / "step-1" / "trained.pt").is_file()
    assert (tmp_path / "run" / "release" / "osediff.pkl").is_file()
    assert main(["train", str(file), "--set", "train.steps"]) == 2  # not KEY=VALUE


@pytest.mark.slow
def test_two_processes_train_together(tmp_path, tiny_base, hr_dir, metric_weights):
    """Distributed data parallel on two CPU processes (gloo), with accumulation and two phases per step."""
    import os
    import subprocess
    import sys

    import yaml

    file = tmp_path / "ddp.yaml"
    file.write_text(yaml.safe_dump({
        "method": "osediff", "base": str(tiny_base), "output_dir": str(tmp_path / "run"),
        "data": {"hr": [str(hr_dir)], "crop": 64},
        "train": {"steps": 2, "gradient_accumulation": 2, "log_with": "none"},
        "method_args": {"lpips_weights": str(metric_weights)}}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffsr.cli",
                           "train", str(file), "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [row["step"] for row in logged(tmp_path / "run")] == [1, 2]  # the main process logs, once per step
    assert done.stdout.count("trained weights in the release format") == 1
    assert (tmp_path / "run" / "release" / "osediff.pkl").is_file()


class Payload:
    """Unpickles as a call to exec that writes a marker file (it runs only if a file is unpickled fully)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_planted_checkpoint_payload_never_runs(tmp_path, tiny_base, hr_dir, metric_weights):
    out, marker = tmp_path / "run", tmp_path / "ran"
    train(osediff_config(out, tiny_base, hr_dir, metric_weights, train={"steps": 1, "save_every": 1}), progress=False)
    planted = out / "checkpoints" / "step-1" / "trained.pt"
    saved = torch.load(planted, weights_only=True)  # the checkpoint holds only tensors and plain values
    torch.save({**saved, "note": Payload(marker)}, planted)
    with pytest.warns(UserWarning, match=r"step-1.trained.pt: holds pickled objects diffsr will not unpickle"):
        result = train(osediff_config(out, tiny_base, hr_dir, metric_weights, train={"steps": 1, "save_every": 1}),
                       progress=False)
    assert not marker.exists()
    assert list(result["losses"]["loss"]) and [row["step"] for row in logged(out)] == [1]  # started afresh
    assert list((out / "checkpoints").iterdir()) == [out / "checkpoints" / "step-1"]
    aside = list(out.glob("checkpoints.old-*"))  # the planted file is kept aside, not resumed, not deleted
    assert len(aside) == 1 and (aside[0] / "step-1" / "trained.pt").is_file()


@pytest.mark.slow  # over 10 s on CI's 2 cores; the default run must stay under 10 minutes
def test_a_fresh_start_never_mixes_with_an_older_run(tmp_path, tiny_base, hr_dir, metric_weights):
    """`diffsr train --no-resume` over an older, longer run, then a plain rerun: it resumes the new run."""
    out = tmp_path / "run"

    def config(steps, seed):
        return osediff_config(out, tiny_base, hr_dir, metric_weights,
                              train={"steps": steps, "save_every": 1, "seed": seed})

    old = trained_state(train(config(3, 0), progress=False)["trainer"])  # keeps step-2 and step-3
    with pytest.warns(UserWarning, match="starting a new run: the checkpoints of the earlier run .* moved to"):
        new = trained_state(train(config(1, 1), resume=False, progress=False)["trainer"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    aside = list(out.glob("checkpoints.old-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["log.jsonl", "step-2", "step-3"]
    rerun = trained_state(train(config(1, 1), progress=False)["trainer"])
    assert all(torch.equal(rerun[name], new[name]) for name in new)
    assert not all(torch.equal(rerun[name], old[name]) for name in old)
    released = torch.load(out / "release" / "osediff.pkl", weights_only=True)["state_dict_unet"]
    name = next(k for k in released if "lora_B" in k)
    assert any(torch.equal(released[name], tensor) for tensor in new.values())
    # A checkpoint of another run put beside this run's is never resumed, even when it is newer.
    shutil.copytree(aside[0] / "step-3", out / "checkpoints" / "step-3")
    with pytest.warns(UserWarning, match=r"step-3: a checkpoint of another run"):
        again = trained_state(train(config(1, 1), progress=False)["trainer"])
    assert all(torch.equal(again[name], new[name]) for name in new)


def test_resume_skips_a_damaged_checkpoint_and_a_half_written_log_line(tmp_path, tiny_base, hr_dir, metric_weights):
    out = tmp_path / "run"
    config = osediff_config(out, tiny_base, hr_dir, metric_weights,
                            train={"steps": 3, "save_every": 1, "keep_checkpoints": 3})
    train(config, progress=False)
    log = (out / "log.jsonl").read_text()
    (out / "checkpoints" / "step-3" / "trained.pt").write_bytes(b"")  # empty (disk full)
    half = out / "checkpoints" / "step-2" / "trained.pt"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])  # truncated
    with open(out / "log.jsonl", "a") as file:
        file.write('{"step": 4, "loss": 0.1')  # the process died while writing
    with pytest.warns(UserWarning) as warned:
        result = train(config, progress=False)
    messages = [str(w.message) for w in warned]
    assert any("step-3" in m and "corrupt or truncated" in m for m in messages)
    assert any("step-2" in m and "corrupt or truncated" in m for m in messages)
    assert any("log.jsonl" in m and "line 4" in m for m in messages)
    assert len(result["losses"]["loss"]) == 2  # resumed from step-1: steps 2 and 3 ran again
    assert (out / "log.jsonl").read_text() == log  # and drew exactly what the first run drew
