"""Every command in README.md's ```bash blocks runs as written (DESIGN.md, "Contracts"): pasted into bash
in a fresh folder that holds the repository's scripts and configs, with only step counts, sizes and shard
lists shrunk by overrides appended to the command (later Hydra overrides and argparse options win).

COMMANDS lists every README command: how it runs (its chain, the overrides appended, what it must leave
behind) or why it is skipped. A README command missing from the table fails the test, so a new command
cannot go untested. Commands of one chain (train into runs/digits, then score it, sample it, resume it)
share one working folder and run in README order; selecting a later one runs the earlier ones first.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tiny import REPO

README = REPO / "README.md"

# A training run of a few steps at batch 8 with every callback still on (validation, checkpoints, grids).
TRAIN = (
    "trainer.max_steps=2 data.batch_size=8 trainer.val_check_interval=2 trainer.limit_val_batches=1 "
    "callbacks.model_checkpoint.every_n_train_steps=2 callbacks.sample_grid.every_n_steps=2 "
    "callbacks.sample_grid.steps=2 callbacks.sample_grid.n_per_prompt=1 trainer.enable_progress_bar=false"
)
AE_TRAIN = (
    "trainer.max_steps=4 model.disc_start=1 data.batch_size=8 trainer.val_check_interval=2 "
    "trainer.limit_val_batches=1 model.scale_factor_batches=1 "
    "callbacks.model_checkpoint.every_n_train_steps=2 trainer.enable_progress_bar=false"
)
# DreamBooth from the digits chain's model: 2 class images in 2 sampler steps, 2 training steps.
DREAMBOOTH = (
    "trainer.max_steps=2 data.num_class_images=2 data.class_steps=2 "
    "callbacks.model_checkpoint.every_n_train_steps=2 callbacks.sample_grid.every_n_steps=2 "
    "callbacks.sample_grid.steps=2 callbacks.sample_grid.n_per_prompt=1 trainer.enable_progress_bar=false"
)


@dataclass
class Run:
    chain: str  # commands of a chain share a working folder, in README order
    append: str = ""  # appended to the command as written
    expect: list[str] = field(default_factory=list)  # paths (relative to the folder) it must create
    absent: list[str] = field(default_factory=list)  # paths it must not create
    slow: bool = False


@dataclass
class Skip:
    reason: str


SD15 = "/models/v1-5-pruned-emaonly.safetensors"
CLIP_L = "/models/clip-vit-large-patch14"
BENCH = "tests/test_benchmarks.py runs this command line at tiny sizes and checks its table and JSON"
SET_UP = "set-up: CI (.ci/run) runs it in a fresh clone and environment"
COCO = (
    "needs SD1.5 weights, COCO shards, the Inception weights file and a CLIP model; the same code runs on "
    "the digits above and in tests/test_eval_script.py"
)

COMMANDS: dict[str, Run | Skip] = {
    "python -m venv .venv && . .venv/bin/activate": Skip(SET_UP),
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu": Skip(SET_UP),
    'pip install -e ".[dev]"': Skip(SET_UP),
    "python train.py": Run("quickstart", TRAIN),  # the run folder it prints is checked below
    'python -m pytest -m "not slow"': Skip("the test suite itself: CI runs it"),
    # The reproduce block: train into runs/digits, score it, draw into samples/.
    "python train.py hydra.run.dir=runs/digits": Run(
        "digits", TRAIN, ["runs/digits/export/ldm_pipeline.json", "runs/digits/checkpoints/last.ckpt"]
    ),
    "python -m ldm.eval.digits runs/digits --n 50": Run("digits", "--n 1 --steps 2"),
    "python -m ldm.eval.digits runs/digits --n 50 --sampler dpmpp_2m --steps 20 --guidance-scale 3": Run(
        "digits",
        "--n 1 --steps 2",
        slow=True,  # the command above with other flags (12 s)
    ),
    'python sample.py ckpt=runs/digits prompt="a photo of the digit seven" n=8 out_dir=samples/': Run(
        "digits", "n=1 steps=2", ["samples/00000.png", "samples/metadata.jsonl"], absent=["outputs/samples"]
    ),
    # Stage one, then stage two on its export.
    "python train.py experiment=digits_ae hydra.run.dir=runs/digits_ae": Run(
        "digits_ae", AE_TRAIN, ["runs/digits_ae/export/autoencoder.safetensors"]
    ),
    "python train.py model.autoencoder.path=runs/digits_ae/export/autoencoder.safetensors "
    "hydra.run.dir=runs/digits_own_ae": Run(
        "digits_ae", TRAIN, ["runs/digits_own_ae/export/ldm_pipeline.json"]
    ),
    # Training examples.
    "python train.py experiment=sd15_laion \"data.urls='/data/laion/{00000..09999}.tar'\" "
    f"model.autoencoder.path={SD15} model.conditioner.version={CLIP_L} "
    "trainer.devices=8 trainer.num_nodes=4": Skip(
        "needs the released SD1.5 weights, CLIP ViT-L/14 and 32 GPUs; the recipe runs with tiny networks "
        "in tests/test_experiments.py"
    ),
    "python train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2 data.resampled=true "
    "hydra.run.dir=runs/digits_ddp": Run("ddp", TRAIN, ["runs/digits_ddp/checkpoints/last.ckpt"], slow=True),
    "python train.py hydra.run.dir=runs/digits ckpt_path=runs/digits/checkpoints/last.ckpt": Run(
        "digits",
        TRAIN + " trainer.max_steps=3 callbacks.model_checkpoint.every_n_train_steps=1",
        ["runs/digits/checkpoints/step0000003.ckpt", "runs/digits/csv/version_1"],  # it trained on
    ),
    "python train.py hydra.run.dir=runs/digits resume=auto": Run(
        "digits",
        TRAIN + " trainer.max_steps=4 callbacks.model_checkpoint.every_n_train_steps=1",
        ["runs/digits/checkpoints/step0000004.ckpt", "runs/digits/csv/version_2"],  # went on from step 3
    ),
    "python train.py model=ldm/sd15 trainer=gpu data=folder data.root=/my/images data.resolution=512 "
    f"model.init_from={SD15} model.autoencoder.path={SD15} model.conditioner.version={CLIP_L}": Skip(
        "needs the released SD1.5 weights and a GPU"
    ),
    "python train.py -m model.optimizer.lr=1e-4,3e-4 model.ucg_rate=0.05,0.1": Run(
        "sweep", TRAIN.replace("max_steps=2", "max_steps=1"), ["outputs/digits/multirun"], slow=True
    ),
    # Your own images, as shards, for the digits-size model.
    "python -m ldm.data.shards my_images/ my_shards/ --shard-size 1000 --resize 32": Run(
        "shards", "--shard-size 20", ["my_shards/00000.tar", "my_shards/00001.tar"]
    ),
    "python train.py data=webdataset \"data.urls='my_shards/{00000..00009}.tar'\" data.resolution=32 "
    "hydra.run.dir=runs/my_shards": Run(
        "shards",
        TRAIN + " \"data.urls='my_shards/{00000..00001}.tar'\" data.num_workers=0",
        ["runs/my_shards/export/ldm_pipeline.json"],
    ),
    "python benchmarks/data_loading.py": Skip("a benchmark that takes minutes; benchmarks/ are run by hand"),
    # LoRA on the reproduce block's model (the experiment itself also runs fast in tests/test_experiments.py).
    "python train.py experiment=digits_lora model.init_from=runs/digits/export "
    "hydra.run.dir=runs/digits_lora": Run(
        "lora", TRAIN, ["runs/digits_lora/export/lora.safetensors"], slow=True
    ),
    "python sample.py ckpt=runs/digits/export lora=runs/digits_lora/export/lora.safetensors lora_scale=0.8 "
    'prompt="a photo of sks digit" n=8 guidance_scale=3 out_dir=samples/sks': Run(
        "lora", "n=1 steps=2", ["samples/sks/00000.png"], slow=True
    ),
    f"python train.py experiment=lora_sd15 model.init_from={SD15} model.conditioner.version={CLIP_L} "
    "data.root=/data/my_photos": Skip("needs the released SD1.5 weights and a GPU"),
    f"python train.py experiment=finetune_sd15 model.init_from={SD15} model.conditioner.version={CLIP_L} "
    "data.root=/data/my_photos": Skip("needs the released SD1.5 weights and a GPU"),
    # Performance: tests/test_benchmarks.py (slow) runs each of these command lines at tiny sizes and checks
    # what it prints and writes; running them here again would double the slow tier's longest minutes.
    "python benchmarks/unet_step.py --json runs/bench/unet_step.json": Skip(BENCH),
    "python benchmarks/roofline.py --diffusers --json runs/bench/roofline.json": Skip(BENCH),
    "python benchmarks/sampling.py --json runs/bench/sampling.json": Skip(BENCH),
    "python benchmarks/train_throughput.py --json runs/bench/train_throughput.json": Skip(BENCH),
    "python benchmarks/train_throughput.py --cached --json runs/bench/train_cached.json": Skip(BENCH),
    "python benchmarks/gpu.py --json runs/bench/gpu.json": Skip(BENCH),
    "python benchmarks/unet_step.py --malloc reuse --json runs/bench/unet_step_reuse.json": Skip(BENCH),
    "python benchmarks/conv_lowering.py --json runs/bench/conv_lowering.json": Skip(BENCH),
    "python benchmarks/train_throughput.py --encoders tiny --json runs/bench/train_tiny.json": Skip(BENCH),
    # Sampling, on the reproduce block's run.
    'python sample.py ckpt=runs/digits prompt="a photo of the digit three" n=4 sampler=euler_a steps=30 '
    "guidance_scale=7.5 seed=0": Run("digits", "n=1 steps=2", ["outputs/samples"]),
    "printf 'a photo of the digit one\\na photo of the digit two\\n' > prompts.txt": Run(
        "digits", "", ["prompts.txt"]
    ),
    'python sample.py ckpt=runs/digits prompts_file=prompts.txt negative_prompt="blurry" height=32 width=64 '
    "out_dir=samples/wide": Run("digits", "steps=2", ["samples/wide/00001.png"]),
    'python sample.py ckpt=runs/digits prompt="a photo of the digit eight" init_image=samples/00000.png '
    "strength=0.6 out_dir=samples/img2img": Run("digits", "steps=2", ["samples/img2img/00000.png"]),
    # Evaluation, on the reproduce block's run (COCO commands need released weights and data).
    "python -m ldm.eval ckpt=runs/digits prompts=data/digits/32px/val ref=data/digits/32px/val "
    "extractor=digits n=179 steps=20 guidance_scale=3 out_dir=evals/digits": Run(
        "digits", "n=4 steps=2", ["evals/digits/metrics.json", "evals/digits/00003.png"]
    ),
    "python sample.py ckpt=runs/digits prompts_file=prompts.txt n=50 guidance_scale=3 "
    "out_dir=samples/prompted": Run("digits", "n=2 steps=2", ["samples/prompted/00003.png"]),
    "python -m ldm.eval images=samples/prompted ref=data/digits/32px/val extractor=digits "
    "out_dir=evals/prompted": Run("digits", "", ["evals/prompted/metrics.json"]),
    "python -m ldm.eval -m guidance_scale=1.5,3,5 ckpt=runs/digits prompts=data/digits/32px/val "
    "ref=data/digits/32px/val extractor=digits n=179 out_dir=evals/digits_sweep": Run(
        "digits",
        "n=4 steps=2",
        ["evals/digits_sweep/curve.png", "evals/digits_sweep/2/metrics.json"],
        slow=True,
    ),
    "torchrun --nproc_per_node 2 -m ldm.eval ckpt=runs/digits prompts=data/digits/32px/val "
    "ref=data/digits/32px/val extractor=digits n=179 out_dir=evals/digits_2proc": Run(
        "digits", "n=4 steps=2", ["evals/digits_2proc/metrics.json"], slow=True
    ),
    "python -m ldm.eval -m guidance_scale=1.5,3,5,7.5 ckpt=/models/v1-5-pruned-emaonly.safetensors "
    "\"prompts='/data/coco/val2014-{00000..00029}.tar'\" \"ref='/data/coco/val2014-{00000..00029}.tar'\" "
    "n=30000 image_size=256 sampler=dpmpp_2m steps=25 "
    "inception_weights=/models/pt_inception-2015-12-05-6726825d.pth "
    "clip_model=/models/clip-vit-large-patch14 out_dir=evals/sd15_coco256": Skip(COCO),
    "accelerate launch --multi_gpu --num_processes 8 -m ldm.eval "
    "ckpt=/models/v1-5-pruned-emaonly.safetensors \"prompts='/data/coco/val2014-{00000..00029}.tar'\" "
    "ref=/data/coco/fid_stats_coco512.npz n=30000 "
    "image_size=512 guidance_scale=3 inception_weights=/models/pt_inception-2015-12-05-6726825d.pth "
    "clip_model=/models/clip-vit-large-patch14 out_dir=evals/sd15_coco512": Skip(COCO + " and 8 GPUs"),
    # DreamBooth and cached latents, from the digits chain's model.
    "python -m ldm.data.dreambooth_digits write data/dreambooth/sks_digit --digit 3 --n 5": Run(
        "digits", "--n 2", ["data/dreambooth/sks_digit/sks_3_01.png"]
    ),
    "python -m ldm.data.dreambooth_digits score runs/digits --digit 3": Run(
        "digits", "--n 1 --steps 2", slow=True
    ),
    "python train.py experiment=digits_dreambooth model.init_from=runs/digits/export "
    "hydra.run.dir=runs/sks3": Run(
        "digits",
        DREAMBOOTH,
        ["runs/sks3/export/ldm_pipeline.json", "data/dreambooth/class_digits/class_00001.png"],
        slow=True,  # tests/test_experiments.py runs digits_dreambooth in the fast tier
    ),
    "python -m ldm.data.dreambooth_digits score runs/sks3 --digit 3": Run(
        "digits", "--n 1 --steps 2", slow=True
    ),
    "python train.py experiment=digits_dreambooth model.init_from=runs/digits/export data.class_prompt=null "
    "data.class_root=null hydra.run.dir=runs/sks3_no_prior": Run(
        "digits", DREAMBOOTH, ["runs/sks3_no_prior/export/ldm_pipeline.json"], slow=True
    ),
    "python train.py experiment=digits_dreambooth model.init_from=runs/digits/export "
    'data.class_prompt="a photo of a digit" data.class_root=data/dreambooth/class_generic '
    "hydra.run.dir=runs/sks3_generic": Run(
        "digits", DREAMBOOTH, ["data/dreambooth/class_generic/class_00001.png"], slow=True
    ),
    f"python train.py experiment=dreambooth_sd15 model.init_from={SD15} model.autoencoder.path={SD15} "
    f"model.conditioner.version={CLIP_L} data.instance_root=/data/dog data.class_root=/data/class_dog": Skip(
        "needs the released SD1.5 weights, CLIP ViT-L/14 and a GPU; the recipe runs with tiny networks in "
        "tests/test_experiments.py"
    ),
}


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands() -> list[str]:
    """The commands of README.md's ```bash blocks: `\\` continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = " ".join(strip_comment(line).split())
            if command:
                commands.append(command)
    return commands


def chain_setup(chain: str, folder: Path) -> None:
    """What a user has before a chain starts, beyond the repository: for `shards`, a folder of images
    with same-stem .txt captions (40 of the bundled digits)."""
    if chain == "shards":
        from sklearn.datasets import load_digits

        from ldm.data.digits import digit_image

        data = load_digits()
        words = "zero one two three four five six seven eight nine".split()
        (folder / "my_images").mkdir()
        for i in range(40):
            digit_image(data.images[i], 32).save(folder / "my_images" / f"{i:03d}.png")
            caption = f"a photo of the digit {words[data.target[i]]}"
            (folder / "my_images" / f"{i:03d}.txt").write_text(caption)
    if (
        chain == "lora"
    ):  # the reproduce block's runs/digits/export, built (its training is the digits chain's)
        subprocess.run(
            [sys.executable, "-c", "from tests.test_readme_commands import digits_export as d; import sys; "
             "d(sys.argv[1])", str(folder / "runs/digits/export")],
            cwd=REPO, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip


def digits_export(path: str) -> None:
    """The default experiment's model (untrained) exported to `path`, as `python train.py` leaves it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldm.training.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train")
    instantiate(cfg.model).to_pipeline().save(path)


class Chains:
    """One working folder per chain (the repository's scripts and configs linked in) and what ran there."""

    def __init__(self, root: Path):
        self.root, self.done = root, set()

    def folder(self, chain: str) -> Path:
        folder = self.root / chain
        if not folder.exists():
            folder.mkdir(parents=True)
            for name in ("train.py", "sample.py", "configs", "benchmarks"):
                (folder / name).symlink_to(REPO / name)
            chain_setup(chain, folder)
        return folder

    def run(self, command: str) -> subprocess.CompletedProcess:
        spec = COMMANDS[command]
        for earlier in readme_commands():  # the chain's earlier commands first, once
            if earlier == command:
                break
            other = COMMANDS.get(earlier)
            # A fast command skips the slow ones before it: they make nothing it reads (were that to change,
            # its `expect` paths or its own run would fail). The fast tier lost ~55 s to them (DreamBooth).
            if other is None or isinstance(other, Skip) or (other.slow and not spec.slow):
                continue
            if other.chain == spec.chain and earlier not in self.done:
                self.run(earlier)
        folder = self.folder(spec.chain)
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python`: this interpreter
        env.pop("WANDB_API_KEY", None)
        proc = subprocess.run(
            ["bash", "-c", f"{command} {spec.append}"], cwd=folder, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, f"{command} {spec.append}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        for path in spec.expect:
            assert (folder / path).exists(), f"{command}: no {path}"
        for path in spec.absent:
            assert not (folder / path).exists(), f"{command}: made {path}"
        self.done.add(command)
        return proc


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> Chains:
    return Chains(tmp_path_factory.mktemp("readme"))


def test_every_readme_command_is_in_the_table():
    commands = readme_commands()
    missing = [c for c in commands if c not in COMMANDS]
    assert not missing, f"README commands without an entry in COMMANDS: {missing}"
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, f"COMMANDS entries no longer in README.md: {stale}"


def _params():
    for i, command in enumerate(readme_commands()):
        spec = COMMANDS.get(command)
        marks = [pytest.mark.slow] if isinstance(spec, Run) and spec.slow else []
        yield pytest.param(command, id=f"{i:02d}-{command[:60]}", marks=marks)


@pytest.mark.parametrize("command", _params())
def test_readme_command_runs(command, chains):
    spec = COMMANDS.get(command)
    if spec is None:
        pytest.fail(f"not in COMMANDS: {command}")
    if isinstance(spec, Skip):
        pytest.skip(spec.reason)
    proc = chains.run(command)
    if command == "python train.py":  # the run folder is printed first, and it is where the results are
        folder = Path(re.search(r"^run folder: (.+)$", proc.stdout, flags=re.M).group(1))
        assert folder.parent.parent == (chains.folder("quickstart") / "outputs" / "digits").resolve()
        assert (folder / "export" / "ldm_pipeline.json").is_file()
        assert any(p.name.startswith("best-step") for p in (folder / "checkpoints").iterdir())
