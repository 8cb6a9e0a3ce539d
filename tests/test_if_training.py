"""train_text_to_image.py and if_inference.py end to end with a tiny random IF model (CPU, offline)."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from conftest import REPO, random_images, write_edm_dataset
from fixtures import save_tiny_if_upscaler

ENV = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', WANDB_MODE='disabled', OMP_NUM_THREADS='2')


def _run(script, *args, check=True, **env):
    res = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=dict(ENV, **env), capture_output=True,
                         text=True)
    if check and res.returncode != 0:
        raise AssertionError(f'{script} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}')
    return res


def _infer(*args, check=True):
    """if_inference.py in this process (its imports are loaded once): returns the click result."""
    import if_inference
    res = CliRunner().invoke(if_inference.main, [str(a) for a in args])
    if check and res.exit_code != 0:
        raise AssertionError(f'if_inference.py failed:\n{res.output[-3000:]}') from res.exception
    return res


def _stats(run):
    with open(os.path.join(run, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def data16(tmp_path_factory):
    return write_edm_dataset(tmp_path_factory.mktemp('ifdata') / 'data', random_images(10, 3, 16))


def _train_args(tiny_if, data, out, steps):
    return ['--pretrained_model_name_or_path', tiny_if, '--train_data_dir', data, '--resolution', 16,
            '--train_batch_size', 4, '--max_train_steps', steps, '--checkpointing_steps', 2, '--state_dict_steps', 2,
            '--lr_warmup_steps', 0, '--use_ema', '--output_dir', out, '--corruption_probability', 0.5]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_if, data16):
    """A 4-step run with every output switched on (EMA, clean diagnostics, validation, checkpoint limit)."""
    out = str(tmp_path_factory.mktemp('iftrain') / 'run')
    _run('train_text_to_image.py', *_train_args(tiny_if, data16, out, 4), '--clean_diagnostics',
         '--validation_prompts', 'a cat,', '--validation_steps', 2, '--validation_inference_steps', 3,
         '--checkpoints_total_limit', 1, '--report_to', 'tensorboard')
    return out


@pytest.mark.slow  # the module's 4-step IF training run: 8 s on 2 cores
def test_training_outputs(trained):
    files = set(os.listdir(trained))
    assert {'checkpoint-4', 'state_dict_2.pt', 'state_dict_4.pt', 'stats.jsonl', 'training_options.json',
            'empty_embeds.pt', 'artifacts', 'logs'} <= files
    assert 'checkpoint-2' not in files  # --checkpoints_total_limit=1
    assert not any(f.endswith('.tmp') for f in files)
    stats = _stats(trained)
    assert [s['step'] for s in stats] == [1, 2, 3, 4]
    for s in stats:
        assert {'loss', 'loss_hat', 'loss_all', 'loss_unobserved', 'lr'} <= set(s)
        assert all(np.isfinite(s[k]) for k in ('loss', 'loss_hat', 'loss_all', 'loss_unobserved'))
    art = set(os.listdir(os.path.join(trained, 'artifacts')))
    assert {'observed.png', 'hat_observed.png', 'masks.png', 'clean.png', 'validation_000002.png',
            'validation_000004.png', 'predictions_000000.png', 'noisy_inputs_000000.png'} <= art
    state = torch.load(os.path.join(trained, 'state_dict_4.pt'), weights_only=True)
    assert 'conv_in.weight' in state and not any(k.startswith(('module.', '_orig_mod.')) for k in state)
    assert os.listdir(os.path.join(trained, 'logs', 'text2image-fine-tune'))


@pytest.mark.slow
def test_resume_continues_the_same_run(tmp_path, trained, tiny_if, data16):
    # 2 steps, then resume to 4: the same weights as 4 steps straight (diagnostics and validation change nothing).
    out = str(tmp_path / 'run')
    _run('train_text_to_image.py', *_train_args(tiny_if, data16, out, 2), '--report_to', 'none')
    with open(os.path.join(out, 'stats.jsonl'), 'a') as f:  # A step logged after the checkpoint, then a crash.
        f.write(json.dumps(dict(step=3, loss=0.0)) + '\n')
    res = _run('train_text_to_image.py', *_train_args(tiny_if, data16, out, 4), '--report_to', 'none',
               '--resume_from_checkpoint', 'latest')
    assert 'starting at step 2' in res.stdout + res.stderr
    assert [s['step'] for s in _stats(out)] == [1, 2, 3, 4]
    a = torch.load(os.path.join(trained, 'state_dict_4.pt'), weights_only=True)
    b = torch.load(os.path.join(out, 'state_dict_4.pt'), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(_stats(trained), _stats(out)):
        assert x['loss'] == pytest.approx(y['loss'], rel=1e-6)


@pytest.mark.slow
def test_hf_imagefolder_with_captions_and_other_options(tmp_path, tiny_if):
    # Captions through the text encoder, 8-bit AdamW, accumulation, gradient checkpointing, offset noise, a cosine
    # schedule and wandb in offline mode.
    folder = tmp_path / 'imagefolder'
    folder.mkdir()
    captions = ['a photo of a cat', 'a dog', 'the face of a person', 'a cat']
    with open(folder / 'metadata.jsonl', 'w') as f:
        for i, (img, text) in enumerate(zip(random_images(4, 3, 24, seed=3), captions)):
            PIL.Image.fromarray(img).save(folder / f'{i}.png')
            f.write(json.dumps(dict(file_name=f'{i}.png', text=text)) + '\n')
    out = tmp_path / 'run'
    res = _run('train_text_to_image.py', '--pretrained_model_name_or_path', tiny_if, '--dataset_name', folder,
               '--resolution', 16, '--random_flip', '--train_batch_size', 2, '--max_train_steps', 2, '--use_8bit_adam',
               '--gradient_accumulation_steps', 2, '--gradient_checkpointing', '--noise_offset', 0.1,
               '--lr_scheduler', 'cosine', '--lr_warmup_steps', 1, '--report_to', 'wandb', '--output_dir', out,
               WANDB_MODE='offline', WANDB_DIR=str(tmp_path))
    assert 'captions' in res.stdout + res.stderr
    stats = _stats(out)
    assert [(s['step'], s['epoch']) for s in stats] == [(1, 0), (2, 0)]  # 8 items (flips), 4 batches, 2 updates
    assert stats[0]['lr'] > stats[1]['lr'] >= 0  # warm-up to the peak, then cosine decay to 0
    assert os.path.isfile(out / 'state_dict_2.pt')
    assert any(d.startswith('offline-run') for d in os.listdir(tmp_path / 'wandb'))


@pytest.mark.slow  # needs the IF training run
def test_inference_is_batch_independent_resumable_and_upscales(tmp_path, trained, tiny_if):
    upscaler = save_tiny_if_upscaler(tmp_path / 'IF-II-tiny', resolution=32)
    ckpt = os.path.join(trained, 'state_dict_4.pt')
    common = ['--pretrained_model_name_or_path', tiny_if, '--checkpoint_path', ckpt, '--num_images', 3,
              '--num_inference_steps', 4, '--corruption_probability', 0.5, '--seed', 5]
    _infer(*common, '--output_dir', tmp_path / 'a', '--batch_size', 3, '--save_collage',
         '--upscale', '--upscaler_model', upscaler, '--upscale_steps', 2)
    _infer(*common, '--output_dir', tmp_path / 'b', '--batch_size', 2)
    for i in range(3):
        a = np.asarray(PIL.Image.open(tmp_path / 'a' / 'images' / '000000' / f'{i:06d}.png'))
        b = np.asarray(PIL.Image.open(tmp_path / 'b' / 'images' / '000000' / f'{i:06d}.png'))
        assert a.shape == (16, 16, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1
        up = PIL.Image.open(tmp_path / 'a' / 'upscaled' / '000000' / f'{i:06d}.png')
        assert up.size == (32, 32)
    assert os.path.isfile(tmp_path / 'a' / 'collages' / 'images_000000.png')
    os.remove(tmp_path / 'b' / 'images' / '000000' / '000001.png')
    res = _infer(*common, '--output_dir', tmp_path / 'b', '--batch_size', 2)
    assert 'Generated 1 images (2 already there)' in res.output
    again = np.asarray(PIL.Image.open(tmp_path / 'b' / 'images' / '000000' / '000001.png'))
    first = np.asarray(PIL.Image.open(tmp_path / 'a' / 'images' / '000000' / '000001.png'))
    assert np.abs(again.astype(int) - first.astype(int)).max() <= 1
    res = _infer(*common[:-1], 6, '--output_dir', tmp_path / 'b', check=False)
    assert res.exit_code != 0 and "--seed: 5 -> 6" in res.output
    # The original's --save_separate: False keeps only the collages, and a rerun skips their batches.
    _infer(*common, '--output_dir', tmp_path / 'c', '--batch_size', 3, '--save_collage', '--save_separate', False)
    assert not os.path.exists(tmp_path / 'c' / 'images') and os.path.isfile(tmp_path / 'c' / 'collages' / 'images_000000.png')
    assert 'Generated 0 images' in _infer(*common, '--output_dir', tmp_path / 'c', '--batch_size', 3, '--save_collage',
                                          '--save_separate', False).output


def test_command_line_errors(tmp_path, tiny_if, data16, monkeypatch):
    import if_inference
    import train_text_to_image
    runner = CliRunner()

    def error(cmd, *args):
        res = runner.invoke(cmd.main, [str(a) for a in args])
        assert res.exit_code != 0 and res.exception is None or isinstance(res.exception, SystemExit), res.output
        lines = [line for line in res.output.splitlines() if line.startswith('Error')]
        assert len(lines) == 1, res.output
        return lines[0]

    out = tmp_path / 'out'
    assert 'exactly one of --train_data_dir' in error(train_text_to_image, '--output_dir', out)
    assert '--pretrained_model_name_or_path' in error(train_text_to_image, '--train_data_dir', data16, '--output_dir',
        out, '--pretrained_model_name_or_path', tmp_path / 'missing-model', '--report_to', 'none')
    assert '--resolution=16' in error(train_text_to_image, '--train_data_dir', data16, '--output_dir', out,
        '--pretrained_model_name_or_path', tiny_if, '--resolution', 64, '--report_to', 'none')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert 'fp16 needs a CUDA device' in error(train_text_to_image, '--train_data_dir', data16, '--output_dir', out,
        '--pretrained_model_name_or_path', tiny_if, '--mixed_precision', 'fp16')
    assert '--image_column has no effect' in error(train_text_to_image, '--train_data_dir', data16,
        '--output_dir', out, '--image_column', 'img')
    assert 'checkpoint-<step>' in error(train_text_to_image, '--train_data_dir', data16, '--output_dir', out,
        '--pretrained_model_name_or_path', tiny_if, '--resolution', 16, '--resume_from_checkpoint', tmp_path,
        '--report_to', 'none')
    # The model loads first: a missing one is named before anything (the empty-prompt embedding) is written.
    assert '--pretrained_model_name_or_path' in error(if_inference, '--output_dir', tmp_path / 'gen',
        '--pretrained_model_name_or_path', tmp_path / 'missing-model')
    assert not (tmp_path / 'gen').exists()
    assert 'huggingface-cli upload' in error(train_text_to_image, '--train_data_dir', data16, '--output_dir', out,
                                             '--push_to_hub')
    assert '--validation_epochs has no effect' in error(train_text_to_image, '--train_data_dir', data16, '--output_dir',
                                                        out, '--validation_epochs', 1)
    if not torch.cuda.is_available():
        assert 'needs a CUDA device' in error(if_inference, '--output_dir', tmp_path / 'gen8', '--pretrained_model_name_or_path',
                                              tiny_if, '--text_encoder_8bit')
    assert '--save_collage' in error(if_inference, '--output_dir', out, '--pretrained_model_name_or_path', tiny_if,
                                     '--save_separate', False)
    assert 'checkpoint not found' in error(if_inference, '--output_dir', out, '--pretrained_model_name_or_path', tiny_if,
        '--checkpoint_path', tmp_path / 'nope.pt')


@pytest.mark.slow
def test_two_processes_with_accelerate(tmp_path, tiny_if, data16):
    out = tmp_path / 'run'
    env = dict(ENV, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
           'train_text_to_image.py', *map(str, _train_args(tiny_if, data16, out, 2)), '--report_to', 'none',
           '--train_batch_size', '2']
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'x 2 processes' in res.stdout + res.stderr
    assert [s['step'] for s in _stats(out)] == [1, 2]
    assert os.path.isfile(out / 'state_dict_2.pt') and os.path.isdir(out / 'checkpoint-2')
    assert {'random_states_0.pkl', 'random_states_1.pkl'} <= set(os.listdir(out / 'checkpoint-2'))
