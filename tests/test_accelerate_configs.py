"""The shipped accelerate configs that run on a machine without GPUs: `trainers/accelerate/cpu_ddp.yaml` starts two
processes that train one model together (`accelerate launch --cpu --num_processes 2` starts one)."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from .testing_utils import ROOT, TINY_RECIPE

CPU_DDP = ROOT / "trainers" / "accelerate" / "cpu_ddp.yaml"


def test_every_accelerate_config_parses_as_accelerate_reads_it():
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted((ROOT / "trainers" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        assert config.num_processes == yaml.safe_load(path.read_text())["num_processes"], path


@pytest.mark.slow
def test_cpu_ddp_config_starts_two_processes_that_train_one_model(tmp_path, saved_model):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP)]
    args = [
        str(ROOT / "trainers" / "unlearn.py"), "--config", str(TINY_RECIPE), "--model_name_or_path", str(saved_model),
        "--num_retain_authors", "2", "--max_steps", "2", "--per_device_train_batch_size", "2", "--lora_dropout", "0",
        "--eval_max_examples", "4", "--output_dir", str(tmp_path / "out"), "--use_cpu", "--disable_tqdm", "true",
    ]  # fmt: skip
    run = subprocess.run([*launch, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    fingerprints = dict(re.findall(r"\[rank (\d)\] trained weights sha256 (\w+)", run.stdout))
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]  # two processes, one model
    assert run.stdout.count("policy wrapped as DistributedDataParallel") == 2
    assert re.findall(r"\[rank (\d)\] wrote", run.stdout) == ["0"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
