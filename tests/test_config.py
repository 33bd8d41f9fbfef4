"""The config tree of a run: one name per knob, every field a flag and a YAML key, every value
checked with an error naming the field before anything starts, derived values from a pure resolve."""

import argparse
import dataclasses

import pytest

from alice_ds.engine import config as C
from alice_ds.engine import flags
from alice_ds.engine.ds_config import resolve_ds_config
from alice_ds.errors import ConfigError, UserError
from alice_ds.sampler import SamplerConfig


def _parser():
    p = argparse.ArgumentParser()
    flags.add_arguments(p)
    return p


def _args(tmp_path, *argv):
    req = ["--output_dir", str(tmp_path), "--deepspeed_config", "x.json", "--cache_dir", str(tmp_path),
           "--json_list", str(tmp_path / "d.json")]
    return flags.config_from_args(_parser().parse_args(req + [str(a) for a in argv]))


def test_every_field_is_a_flag_with_its_docstring_and_default():
    p = _parser()
    by_dest = {a.dest: a for a in p._actions if a.help != argparse.SUPPRESS}  # not the --no-X of a switch
    for section, cls in C.SECTIONS.items():
        docs = flags.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.name in by_dest, f"{section}.{f.name} has no flag"
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"
            assert docs[f.name].split()[0] in by_dest[f.name].help
            assert "(default: " in by_dest[f.name].help
    assert "(default: 0.7)" in by_dest["score_threshold"].help
    assert "(default: 1.0 1.0 10.0)" in by_dest["lambdas"].help
    names = [f.name for cls in C.SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)), "a field name in two sections would give two knobs one flag"


def test_every_sampler_knob_reaches_the_run_from_flags_and_yaml(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("sampler: {rotation: 7.5, noise_std: 0.05, match_candidates: 3, score_threshold: 0.5}\n")
    cfg = _args(tmp_path, "--config", y, "--max_retries", 5, "--intensity_scale", 0.1, "--hu_window", -200, 300)
    s = cfg.sampler
    assert (s.rotation, s.noise_std, s.match_candidates, s.score_threshold) == (7.5, 0.05, 3, 0.5)
    assert (s.max_retries, s.intensity_scale, s.hu_window) == (5, 0.1, (-200.0, 300.0))
    assert isinstance(cfg.sampler, SamplerConfig)


def test_yaml_then_flags_precedence(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("model: {preset: tiny}\nrun: {batch_size: 3, num_steps: 7}\nsampler: {roi: 64}\n")
    cfg = _args(tmp_path, "--config", y, "--num_steps", 9)
    assert (cfg.model.feature_size, cfg.run.batch_size, cfg.run.num_steps, cfg.sampler.roi) == (12, 3, 9, 64)
    assert _args(tmp_path, "--config", y, "--preset", "B").model.feature_size == 48
    assert C.TrainConfig.from_dict(cfg.to_dict()) == cfg
    y.write_text("run: {cudnn_benchmark: false}\n")
    assert _args(tmp_path).run.cudnn_benchmark is True  # the default
    assert _args(tmp_path, "--config", y).run.cudnn_benchmark is False
    assert _args(tmp_path, "--config", y, "--cudnn_benchmark").run.cudnn_benchmark is True
    assert _args(tmp_path, "--no-cudnn_benchmark").run.cudnn_benchmark is False


@pytest.mark.parametrize("yaml_text,message", [
    ("sampler: {mask_block: 15}", "sampler.mask_block must be a positive multiple of the patch size 2, got 15"),
    ("sampler: {score_threshold: 1.5}", "sampler.score_threshold must be in [-1, 1] (a cosine similarity), got 1.5"),
    ("sampler: {roi: 50}", "sampler.roi must be a positive multiple of 32, got 50"),
    ("sampler: {augment_on: gpu}", "sampler.augment_on must be one of auto, worker, device, got 'gpu'"),
    ("sampler: {roi: abc}", "sampler.roi must be an integer, got 'abc'"),
    ("sampler: {hu_window: [1, 2, 3]}", "sampler.hu_window must be a list of 2 numbers, got [1, 2, 3]"),
    ("model: {use_v2: 1}", "model.use_v2 must be true or false, got 1"),
    ("optim: {momentum_end: 2}", "optim.momentum_end must be in [0, 1], got 2.0"),
    ("loss: {lambdas: [1, -1, 10]}", "loss.lambdas must be three weights >= 0, got (1.0, -1.0, 10.0)"),
    ("run: {batch_size: 0}", "run.batch_size must be positive, got 0"),
    ("data: {roi: 64}", "unknown key 'roi' in section 'data' (it belongs to section 'sampler')"),
    ("data: {min_score: 0.5}", "unknown key 'min_score' in section 'data'"),
    ("run: {batch_sise: 3}", "unknown key 'batch_sise' in section 'run'"),
    ("trainer: {}", "unknown section 'trainer'"),
])
def test_bad_values_name_the_field_and_value(tmp_path, yaml_text, message):
    y = tmp_path / "p.yaml"
    y.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError) as e:
        _args(tmp_path, "--config", y)
    assert message in str(e.value)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_required_paths(tmp_path):
    with pytest.raises(UserError, match="--cache_dir is required"):
        flags.config_from_args(_parser().parse_args(["--output_dir", "o", "--deepspeed_config", "x",
                                                     "--json_list", "j"]))


def test_resolve_derives_without_mutating(tmp_path):
    cfg = _args(tmp_path, "--lr", 5e-5)
    before = cfg.to_dict()
    out = C.resolve(cfg, world_size=1, on_gpu=False, cache_spacing=(1.5, 1.5, 2.0))
    assert cfg.to_dict() == before, "resolve must not change its input"
    assert out.optim.min_lr == pytest.approx(0.02 * 5e-5 * 2 / 256)  # 2 % of the scaled peak
    assert out.sampler.augment_on == "worker" and out.data.spacing == (1.5, 1.5, 2.0)
    assert C.resolve(cfg, 1, True, (1.5, 1.5, 2.0)).sampler.augment_on == "device"
    assert C.resolve(_args(tmp_path, "--augment_on", "worker"), 1, True, (1, 1, 1)).sampler.augment_on == "worker"
    assert C.peak_lr(cfg, world_size=128) == pytest.approx(5e-5) and C.global_batch(cfg, 128) == 256
    with pytest.raises(ConfigError, match=r"optim.min_lr 1e-06 must be below the peak lr 1.9531[23]e-07 "
                                          r"\(= lr 5e-05 \* global batch 1 / 256\)"):
        C.resolve(_args(tmp_path, "--lr", 5e-5, "--batch_size", 1, "--min_lr", 1e-6), 1, False, (1, 1, 1))
    with pytest.raises(ConfigError, match=r"data.spacing \(1.0, 1.0, 1.0\) differs from the cache's"):
        C.resolve(_args(tmp_path, "--spacing", 1, 1, 1), 1, False, (1.5, 1.5, 2.0))


def test_ds_config_batch_fields_filled_and_checked(tmp_path):
    cfg = _args(tmp_path, "--batch_size", 2, "--grad_accum", 3)
    ds = resolve_ds_config("ds_configs/zero3_bf16.json", cfg, world_size=4, monitor_dir=str(tmp_path))
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (2, 3, 24)
    assert ds["csv_monitor"]["output_path"] == str(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}')
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu is 4 but the command line gives 2"):
        resolve_ds_config(str(bad), cfg, 4, str(tmp_path))
    bad.write_text('{"bf16": {"enabled": true}}')
    with pytest.raises(UserError, match="torch_autocast"):
        resolve_ds_config(str(bad), cfg, 4, str(tmp_path))
