"""Bad input, kills and reruns: every command fails with one line and writes nothing, nothing is lost or reused.

Each bad-input case asserts a non-zero exit, no traceback, one short `Error:` line that names the problem,
and that the output location is unchanged. The resume cases check the run directory's bookkeeping; the
kill test interrupts a tiny training with SIGKILL at several points and checks that the resumed run equals
an uninterrupted one bit for bit, tick for tick.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import eval as eval_cli
import if_inference
import solve_inverse_problems
import train
from training import snapshots
from conftest import REPO, random_images, write_edm_dataset

TINY = ['--cbase=8', '--cres=1,2', '--num_blocks=1', '--attn=8', '--batch=4', '--lr=1e-3', '--lr_rampup=0',
        '--workers=0', '--augment=0', '--dropout=0', '--ema=0.001', '--tick=0.004', '--snap=1', '--dump=1']


def steps(n, batch=4):
    return f'--duration={n * batch / 1e6}'


def listing(root):
    """Every path under `root` (files and folders), to compare before and after a command."""
    return sorted(os.path.relpath(os.path.join(d, name), root) for d, dirs, files in os.walk(root) for name in dirs + files)


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    """Non-zero exit through click (no traceback), one `Error:` line naming the problem."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f'uncaught {result.exception!r}\n{result.output}'
    assert 'Traceback' not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and len(errors[0]) < 600, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return write_edm_dataset(root / 'data.zip', random_images(12, channels=3, resolution=16, seed=3))


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, data):
    """A finished 3-step run: snapshots and states at every step."""
    out = tmp_path_factory.mktemp('run') / 'run'
    result = invoke(train.main, ['--outdir', out, '--data', data, '--nosubdir', '--seed=1', steps(3), *TINY])
    assert result.exit_code == 0, result.output
    return out


def _folder_dataset(root, images, labels=None):
    """A folder dataset with raw dataset.json labels (any JSON values)."""
    write_edm_dataset(root, images)
    if labels is not None:
        names = sorted(os.path.relpath(p, root).replace(os.sep, '/') for p in glob.glob(os.path.join(root, '*', '*.png')))
        with open(os.path.join(root, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[name, label] for name, label in zip(names, labels)]}, f)
    return str(root)


# ---------------------------------------------------------------------------------------------
# train.py


def _bad_datasets(tmp_path):
    images = random_images(6, channels=3, resolution=16, seed=5)
    corrupt = _folder_dataset(tmp_path / 'corrupt', images)
    victim = sorted(glob.glob(os.path.join(corrupt, '*', '*.png')))[3]
    with open(victim, 'r+b') as f:
        f.truncate(40)
    wrong_size = _folder_dataset(tmp_path / 'wrong_size', images)
    PIL.Image.fromarray(random_images(1, 3, 8, seed=1)[0]).save(sorted(glob.glob(os.path.join(wrong_size, '*', '*.png')))[2])
    gray = _folder_dataset(tmp_path / 'gray', images)
    PIL.Image.fromarray(random_images(1, 1, 16, seed=1)[0, :, :, 0]).save(sorted(glob.glob(os.path.join(gray, '*', '*.png')))[4])
    return [
        ([f'--data={corrupt}'], 'unusable'),
        ([f'--data={wrong_size}'], '8x8'),
        ([f'--data={gray}'], '1 channel'),
        ([f'--data={_folder_dataset(tmp_path / "strings", images, ["cat"] * 6)}', '--cond=True'], 'not a number'),
        ([f'--data={_folder_dataset(tmp_path / "fraction", images, [0, 1, 3.7, 1, 0, 2])}', '--cond=True'], '3.7'),
        ([f'--data={_folder_dataset(tmp_path / "ragged", images, [[0.1, 0.2], [0.3]] * 3)}', '--cond=True'], 'different lengths'),
        ([f'--data={_folder_dataset(tmp_path / "huge", images, [0, 1, 0, 1, 0, 100000])}', '--cond=True'], 'renumber'),
    ]


def test_train_bad_input_is_one_line_and_writes_nothing(tmp_path, data, run_dir):
    out = tmp_path / 'out'
    out.mkdir()
    a_file = tmp_path / 'a-file'
    a_file.write_text('x')
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(open(glob.glob(str(run_dir / 'training-state-*.pt'))[0], 'rb').read()[:500])
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    snapshot = sorted(glob.glob(str(run_dir / 'network-snapshot-*.pt')))[-1]
    other_arch = tmp_path / 'other.pt'
    torch.save({'ema': {'model.weight': torch.zeros(3)}}, other_arch)
    cases = _bad_datasets(tmp_path) + [
        ([f'--outdir={a_file}'], 'is a file'),
        (['--attn=-8'], '-8 is not a resolution'),
        (['--cres=1,1,1,1,1,1'], 'levels'),
        ([f'--resume={truncated}'], 'not a readable training state'),
        ([f'--resume={garbage}'], 'not a readable training state'),
        ([f'--resume={snapshot}'], 'not a training state'),
        ([f'--transfer={truncated}'], 'truncated'),
        ([f'--transfer={garbage}'], 'not a readable'),
        ([f'--transfer={other_arch}'], 'does not fit the network'),
        ([f'--resume={run_dir}', '--allow_data_change', '--transfer', snapshot], 'cannot be combined'),
        (['--allow_data_change'], 'only applies with --resume'),
    ]
    for args, needle in cases:
        before = listing(tmp_path)
        base = ['--outdir', out, '--data', data, steps(2), *TINY]
        result = invoke(train.main, base + args)  # later options win over the base ones
        assert_one_line_error(result, needle)
        assert listing(tmp_path) == before, args


def test_train_refuses_to_mix_runs(tmp_path, data, run_dir):
    run = tmp_path / 'run'
    shutil.copytree(run_dir, run)
    common = ['--data', data, '--seed=1', *TINY]
    # A new run over an existing one.
    assert_one_line_error(invoke(train.main, ['--outdir', run, '--nosubdir', steps(5), *common]), 'already holds a training run')
    # A resume past the end of the run.
    assert_one_line_error(invoke(train.main, ['--outdir', run, '--resume', run, steps(3), *common]), 'already at 0.012 kimg')
    # A resume on other data (same shape).
    other = write_edm_dataset(tmp_path / 'other.zip', random_images(12, channels=3, resolution=16, seed=9))
    result = invoke(train.main, ['--outdir', run, '--resume', run, steps(5), '--data', other, *common[2:], '--seed=1'])
    assert_one_line_error(result, 'trained on other data', '--allow_data_change')
    # An older state in place would overwrite what came after it.
    older = run / 'training-state-000000.008.pt'
    assert_one_line_error(invoke(train.main, ['--outdir', run, '--nosubdir', '--resume', older, steps(5), *common]),
                          'older than the run\'s newest state')
    # A second process on the same run directory.
    before = listing(run)
    with dnnlib.util.directory_lock(str(run)):
        assert_one_line_error(invoke(train.main, ['--outdir', run, '--resume', run, steps(5), *common]), 'in use by another process')
    assert listing(run) == before


def test_resume_from_an_older_state_branches(tmp_path, data, run_dir):
    run = tmp_path / 'run'
    shutil.copytree(run_dir, run)
    before = {name: open(run / name, 'rb').read() for name in os.listdir(run) if name != '.lock'}
    result = invoke(train.main, ['--outdir', tmp_path / 'branches', '--resume', run / 'training-state-000000.008.pt',
                                 '--data', data, steps(3), *TINY])
    assert result.exit_code == 0, result.output
    assert {name: open(run / name, 'rb').read() for name in os.listdir(run) if name != '.lock'} == before
    branch = glob.glob(str(tmp_path / 'branches' / '*'))
    assert len(branch) == 1
    assert sorted(f for f in os.listdir(branch[0]) if f.startswith('network-snapshot')) == ['network-snapshot-000000.012.pt']
    rows = [json.loads(line) for line in open(os.path.join(branch[0], 'stats.jsonl'))]
    assert [r['Progress/tick']['mean'] for r in rows] == [2]  # the tick after the state's, as in the original run


@pytest.mark.slow  # kills training processes
def test_killed_writes_leave_no_temporaries(tmp_path, data, run_dir):
    run = tmp_path / 'run'
    shutil.copytree(run_dir, run)
    (run / '.training-state-000000.016.pt.abc123xy.tmp').write_bytes(b'partial')
    result = invoke(train.main, ['--outdir', run, '--resume', run, '--data', data, steps(4), *TINY, '--seed=1'])
    assert result.exit_code == 0, result.output
    assert not glob.glob(str(run / '.*.tmp')) and 'Removed 1 temporary file' in result.output


def test_fatal_errors_reach_the_log(tmp_path, data, monkeypatch):
    from training import training_loop

    def broken(*args, **kwargs):
        raise ValueError('the dataset broke down')
    monkeypatch.setattr(training_loop, '_construct', broken)
    out = tmp_path / 'run'
    assert_one_line_error(invoke(train.main, ['--outdir', out, '--nosubdir', '--data', data, steps(1), *TINY]),
                          'the dataset broke down')
    assert 'the dataset broke down' in open(out / 'log.txt').read()


# ---------------------------------------------------------------------------------------------
# eval.py, solve_inverse_problems.py, if_inference.py


def test_sampling_commands_bad_input(tmp_path, data, run_dir):
    snapshot = sorted(glob.glob(str(run_dir / 'network-snapshot-*.pt')))[-1]
    a_file = tmp_path / 'a-file'
    a_file.write_text('x')
    truncated = tmp_path / 'network-snapshot-000001.pt'
    truncated.write_bytes(open(snapshot, 'rb').read()[:700])
    bad_pickle = tmp_path / 'network-snapshot-000002.pkl'
    bad_pickle.write_bytes(b'\x80\x04\x95' + np.random.default_rng(1).bytes(300))
    out = tmp_path / 'out'
    gen = ['generate', '--seeds=0-1', '--steps=2']
    solve = ['--measurements_path', data, '--seeds=0', '--steps=2', '--corruption_pattern=dust']
    cases = [
        (eval_cli.cli, gen + [f'--network={snapshot}', f'--outdir={a_file}'], 'is a file'),
        (eval_cli.cli, gen + [f'--network={snapshot}', f'--outdir={out}', '--sigma_min=1e-30'], 'outside'),
        (eval_cli.cli, gen + [f'--network={snapshot}', f'--outdir={out}', '--sigma_max=1e30'], 'outside'),
        (eval_cli.cli, gen + [f'--network={truncated}', f'--outdir={out}'], 'not a readable network snapshot'),
        (eval_cli.cli, gen + [f'--network={bad_pickle}', f'--outdir={out}'], 'damaged or truncated pickle'),
        (eval_cli.cli, ['ref', f'--data={data}', f'--dest={tmp_path}'], 'is a directory'),
        (eval_cli.cli, ['denoise', f'--network={snapshot}', f'--data={data}', f'--outdir={out}', '--sigmas=inf,nan'], 'must lie in'),
        (eval_cli.cli, ['denoise', f'--network={snapshot}', f'--data={data}', f'--outdir={a_file}'], 'is a file'),
        (solve_inverse_problems.main, solve + [f'--network={snapshot}', f'--outdir={out}', '--dps_scale=1e30'], '1e+30'),
        (solve_inverse_problems.main, solve + [f'--network={snapshot}', f'--outdir={a_file}'], 'is a file'),
        (solve_inverse_problems.main, solve + [f'--network={truncated}', f'--outdir={out}'], 'not a readable'),
    ]
    for command, args, needle in cases:
        before = listing(tmp_path)
        assert_one_line_error(invoke(command, args), needle)
        assert listing(tmp_path) == before, args


def test_if_inference_bad_checkpoint_is_one_line(tmp_path, tiny_if):
    truncated = tmp_path / 'state_dict_4.pt'
    torch.save({'w': torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    a_file = tmp_path / 'a-file'
    a_file.write_text('x')
    base = ['--pretrained_model_name_or_path', tiny_if, '--num_images=1', '--batch_size=1', '--num_inference_steps=2']
    before = listing(tmp_path)
    result = invoke(if_inference.main, base + ['--checkpoint_path', truncated, '--output_dir', tmp_path / 'gen'])
    assert_one_line_error(result, 'not a readable state dict of a UNet')
    result = invoke(if_inference.main, base + ['--checkpoint_path', truncated, '--output_dir', a_file])
    assert_one_line_error(result, 'is a file')
    assert listing(tmp_path) == before


def test_generate_refuses_outputs_of_other_settings(tmp_path, run_dir):
    snapshot = sorted(glob.glob(str(run_dir / 'network-snapshot-*.pt')))[-1]
    out = tmp_path / 'gen'
    args = ['generate', f'--network={snapshot}', f'--outdir={out}', '--seeds=0-1', '--batch=2']
    assert invoke(eval_cli.cli, args + ['--steps=2']).exit_code == 0
    images = {p: open(p, 'rb').read() for p in glob.glob(str(out / '*' / '*.png'))}
    assert len(images) == 2
    rerun = invoke(eval_cli.cli, args + ['--steps=2', '--seeds=0-2'])  # same settings: continues
    assert rerun.exit_code == 0 and 'Generating 1 of 3 images' in rerun.output
    assert_one_line_error(invoke(eval_cli.cli, args + ['--steps=3']), 'other settings', 'num_steps')
    assert all(open(p, 'rb').read() == data for p, data in images.items())
    # A folder of images nobody recorded is not adopted either.
    stray = tmp_path / 'stray'
    os.makedirs(stray / '000000.012')
    shutil.copy(next(iter(images)), stray / '000000.012' / '000000.png')
    assert_one_line_error(invoke(eval_cli.cli, ['generate', f'--network={snapshot}', f'--outdir={stray}', '--seeds=0-1',
                                                '--steps=2']), 'no provenance.json')


def test_crafted_snapshots_run_nothing(tmp_path, data, run_dir):
    """A file naming another class than our networks is refused by every command that builds networks."""
    sentinel = tmp_path / 'PWNED'
    crafted = tmp_path / 'network-snapshot-000001.pt'
    torch.save(dict(format=snapshots.SNAPSHOT_FORMAT, ema={}, nimg=1000,
                    network_kwargs={'class_name': 'os.system', 'command': f'touch {sentinel}'}), crafted)
    options = tmp_path / 'orig' / 'training_options.json'
    options.parent.mkdir()
    options.write_text(json.dumps({'network_kwargs': {'class_name': 'os.system', 'command': f'touch {sentinel}'}}))
    import pickle
    with open(options.parent / 'network-snapshot-000001.pkl', 'wb') as f:
        pickle.dump({'ema': {'model.enc.16x16_conv.weight': torch.zeros(8, 6, 3, 3)}}, f)
    for command, args in [
            (eval_cli.cli, ['generate', f'--network={crafted}', f'--outdir={tmp_path / "g"}', '--seeds=0']),
            (eval_cli.cli, ['denoise', f'--network={crafted}', f'--data={data}', f'--outdir={tmp_path / "d"}']),
            (eval_cli.cli, ['generate', f'--network={options.parent / "network-snapshot-000001.pkl"}',
                            f'--outdir={tmp_path / "o"}', '--seeds=0']),
            (solve_inverse_problems.main, [f'--network={crafted}', f'--measurements_path={data}', f'--outdir={tmp_path / "s"}']),
            (train.main, ['--outdir', tmp_path / 't', '--data', data, '--transfer', crafted, steps(1), *TINY])]:
        result = invoke(command, args)
        assert result.exit_code != 0 and not sentinel.exists(), result.output
        assert isinstance(result.exception, SystemExit) and 'Traceback' not in result.output


# ---------------------------------------------------------------------------------------------
# Kills.


def _train_process(out, data, duration_steps, resume):
    args = [sys.executable, 'train.py', '--outdir', str(out), '--nosubdir', '--data', str(data), '--seed=2',
            '--deterministic=True', steps(duration_steps), *TINY, '--dump=2', '--workers=1']
    if resume:
        args += ['--resume', str(out)]
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', WANDB_MODE='disabled')
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _ticks(run):
    rows = [json.loads(line) for line in open(os.path.join(run, 'stats.jsonl'))]
    # Statistics are differences of running sums, exact only to about 1e-9 after a restart.
    return [(round(r['Progress/tick']['mean'], 6), round(r['Progress/kimg']['mean'], 6)) for r in rows]


@pytest.mark.slow  # a dozen training processes: about 1 minute on 2 cores
def test_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path, data):
    total = 12
    straight = tmp_path / 'straight'
    proc = _train_process(straight, data, total, resume=False)
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    killed = tmp_path / 'killed'
    kills, delay = 0, 5.0
    while not (killed / f'training-state-{snapshots.kimg_tag(total * 4)}.pt').exists():
        resume = bool(glob.glob(str(killed / 'training-state-*.pt')))
        if not resume and killed.exists():
            shutil.rmtree(killed)  # killed before its first state: nothing to resume
        proc = _train_process(killed, data, total, resume)
        try:
            code = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            delay += 0.7
            continue
        assert code == 0, proc.stderr.read().decode()[-2000:]
    assert kills >= 2
    assert not glob.glob(str(killed / '.*.tmp'))
    assert _ticks(killed) == _ticks(straight)
    names = lambda run: sorted(f for f in os.listdir(run) if f.startswith(('network-snapshot', 'training-state')))
    assert names(killed) == names(straight)
    for name in names(straight):
        if name.startswith('network-snapshot'):
            a = torch.load(straight / name, weights_only=True)['ema']
            b = torch.load(killed / name, weights_only=True)['ema']
            assert all(torch.equal(a[k], b[k]) for k in a), name
